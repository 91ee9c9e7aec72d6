"""models/layers.py: each layer computes what the Flax layer it replaces computes.

Values and gradients (with respect to the input and the parameters), compiled with jit as the
train step compiles them; the same parameter names, shapes and initial values; and which
implementation runs: the CPU paths on CPU, Flax's/XLA's own elsewhere.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax.infra import process
from mnist_jax.models import layers


def random(shape, seed=0, integers=False):
  rng = np.random.default_rng(seed)
  if integers:  # Few distinct values: windows with tied maxima.
    return jnp.asarray(rng.integers(0, 3, shape), jnp.float32)
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def value_and_vjp(fn, *args):
  """fn(*args) and its gradients for a random output cotangent, under jit."""
  out, vjp = jax.vjp(fn, *args)
  cotangent = random(out.shape, seed=7)
  return jax.jit(lambda *a: (fn(*a), jax.vjp(fn, *a)[1](cotangent)))(*args)


def primitives(fn, *args) -> str:
  return str(jax.make_jaxpr(fn)(*args))


@pytest.fixture
def not_cpu(monkeypatch):
  """Traces as on a GPU or TPU: every layer must take Flax's/XLA's own path."""
  monkeypatch.setattr(layers, '_on_cpu', lambda: False)


# --- max_pool ---------------------------------------------------------------------------------

POOL_CASES = [
    ((2, 28, 28, 32), (2, 2)),  # configs/cnn.py's pools, on a smaller batch.
    ((2, 14, 14, 64), (2, 2)),
    ((3, 7, 9, 5), (2, 2)),  # Odd sizes: the last row and column are dropped, as 'VALID' does.
    ((2, 9, 6, 3), (3, 2)),  # Non-square windows.
    ((2, 10, 3), (2,)),  # 1-D.
    ((2, 3, 4, 4, 2), (2, 2)),  # An extra leading batch dimension.
]


@pytest.mark.parametrize('shape, window', POOL_CASES)
@pytest.mark.parametrize('ties', [False, True])
def test_max_pool_matches_flax(shape, window, ties):
  """Same maxima; the gradient goes to the same element (the first maximum) even with ties."""
  x = random(shape, integers=ties)
  ours = lambda x: layers.max_pool(x, window, strides=window)
  flax_pool = lambda x: nn.max_pool(x, window, strides=window)
  y, (dx,) = value_and_vjp(ours, x)
  y_ref, (dx_ref,) = value_and_vjp(flax_pool, x)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(dx, dx_ref)
  assert int(jnp.sum(dx != 0)) == y.size  # One element per window, even among tied maxima.


def test_max_pool_gradient_goes_to_the_first_maximum_of_a_tie():
  x = jnp.array([[3., 1.], [3., 3.]]).reshape(1, 2, 2, 1)
  dx = jax.grad(lambda x: layers.max_pool(x, (2, 2), strides=(2, 2)).sum())(x)
  np.testing.assert_array_equal(dx.reshape(2, 2), [[1., 0.], [0., 0.]])


def test_max_pool_takes_the_reshape_path_on_cpu_only(not_cpu):
  x = random((2, 8, 8, 3))
  fast = primitives(lambda x: layers._tiled_max(x, (2, 2)), x)  # pylint: disable=protected-access
  assert 'reduce_window' not in fast and 'reduce_max' in fast
  # Elsewhere (and for windows that overlap or pad on any backend), nn.max_pool itself.
  assert primitives(lambda x: layers.max_pool(x, (2, 2), strides=(2, 2)), x) == primitives(
      lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), x)


@pytest.mark.parametrize('strides, padding', [((1, 1), 'VALID'), ((2, 2), 'SAME'), (None, 'VALID')])
def test_max_pool_other_windows_are_flax_s(strides, padding):
  x = random((2, 7, 7, 3))
  ours = primitives(lambda x: layers.max_pool(x, (2, 2), strides=strides, padding=padding), x)
  assert ours == primitives(lambda x: nn.max_pool(x, (2, 2), strides=strides, padding=padding), x)
  assert 'reduce_window' in ours


def test_max_pool_takes_the_reshape_path_here():
  if jax.default_backend() != 'cpu':
    pytest.skip('the reshape path is the CPU path')
  x = random((2, 8, 8, 3))
  assert 'reduce_window' not in primitives(
      lambda x: layers.max_pool(x, (2, 2), strides=(2, 2)), x)


# --- Conv -------------------------------------------------------------------------------------

CONV_CASES = [
    dict(shape=(2, 28, 28, 1), features=32, kernel_size=(3, 3)),  # configs/cnn.py's layers,
    dict(shape=(2, 14, 14, 32), features=64, kernel_size=(3, 3)),  # on a smaller batch.
    dict(shape=(2, 9, 7, 3), features=5, kernel_size=(3, 2), padding='VALID'),
    dict(shape=(2, 9, 7, 6), features=5, kernel_size=(2, 3), padding=((1, 0), (2, 1))),
    dict(shape=(2, 8, 8, 6), features=4, kernel_size=(5, 5), use_bias=False),
    dict(shape=(2, 8, 8, 6), features=4, kernel_size=(1, 1)),
    dict(shape=(2, 8, 8, 2), features=3, kernel_size=(3, 3), padding='SAME_LOWER'),
    dict(shape=(2, 8, 8, 6), features=4, kernel_size=(3, 3), padding='CIRCULAR'),  # Then VALID.
]
# Not the CPU path: XLA's convolution for these.
OTHER_CONVS = [
    dict(shape=(2, 8, 8, 6), features=4, kernel_size=(3, 3), strides=(2, 2)),
    dict(shape=(2, 8, 8, 6), features=4, kernel_size=(3, 3), kernel_dilation=(2, 2)),
    dict(shape=(2, 8, 8, 6), features=4, kernel_size=(3, 3), feature_group_count=2),
    dict(shape=(2, 8, 6), features=4, kernel_size=(3,)),  # 1-D.
]


def init_both(case, seed=1):
  """layers.Conv and nn.Conv with the same fields; their initial variables from one key."""
  fields = {k: v for k, v in case.items() if k != 'shape'}
  x = random(case['shape'])
  ours, theirs = layers.Conv(**fields), nn.Conv(**fields)
  key = jax.random.PRNGKey(seed)
  return x, ours, theirs, ours.init(key, x), theirs.init(key, x)


@pytest.mark.parametrize('case', CONV_CASES + OTHER_CONVS)
def test_conv_has_flax_s_parameters(case):
  _, _, _, ours, theirs = init_both(case)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('case', CONV_CASES + OTHER_CONVS)
def test_conv_matches_flax(case):
  x, ours, theirs, variables, _ = init_both(case)
  # Non-zero biases, so that their gradient path is checked too.
  variables = jax.tree.map(lambda p: p + 0.1 * random(p.shape, seed=3), variables)
  y, (d_vars, dx) = value_and_vjp(ours.apply, variables, x)
  y_ref, (d_vars_ref, dx_ref) = value_and_vjp(theirs.apply, variables, x)
  scale = lambda a: 1e-5 * float(jnp.max(jnp.abs(a)))
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=scale(y_ref))
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=scale(dx_ref))
  for a, b in zip(jax.tree.leaves(d_vars), jax.tree.leaves(d_vars_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=scale(b))


@pytest.mark.parametrize('case', CONV_CASES)
def test_conv_takes_the_cpu_path_on_cpu_only(case, monkeypatch):
  x, ours, theirs, variables, _ = init_both(case)
  monkeypatch.setattr(layers, '_on_cpu', lambda: True)
  assert 'custom_vjp_call' in primitives(ours.apply, variables, x)
  monkeypatch.setattr(layers, '_on_cpu', lambda: False)
  assert primitives(ours.apply, variables, x) == primitives(theirs.apply, variables, x)


@pytest.mark.parametrize('case', OTHER_CONVS)
def test_conv_other_convolutions_are_xla_s(case, monkeypatch):
  x, ours, theirs, variables, _ = init_both(case)
  monkeypatch.setattr(layers, '_on_cpu', lambda: True)
  assert primitives(ours.apply, variables, x) == primitives(theirs.apply, variables, x)


def test_conv_few_channels_forward_is_not_a_convolution(monkeypatch):
  """The first layer on images (1 channel) sums shifted copies; wider inputs use XLA's."""
  monkeypatch.setattr(layers, '_on_cpu', lambda: True)
  few = layers._FEW_CHANNELS  # pylint: disable=protected-access
  for channels, expect_conv in ((1, False), (few, False), (few + 1, True)):
    x = random((2, 8, 8, channels))
    conv = layers.Conv(4, (3, 3))
    variables = conv.init(jax.random.PRNGKey(0), x)
    assert ('conv_general_dilated' in primitives(conv.apply, variables, x)) == expect_conv


# --- The XLA:CPU flag -------------------------------------------------------------------------

_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'


def test_cpu_flags_are_added_to_the_users_flags():
  environ = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  assert process.use_cpu_xla_flags(environ) == [_FLAG]
  assert environ['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=2 {_FLAG}'
  assert process.use_cpu_xla_flags(environ) == []  # Once only.
  assert environ['XLA_FLAGS'].split().count(_FLAG) == 1
  empty = {}
  assert process.use_cpu_xla_flags(empty) == [_FLAG] and empty['XLA_FLAGS'] == _FLAG


def test_a_flag_the_user_set_is_kept():
  mine = '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT'
  environ = {'XLA_FLAGS': mine}
  assert process.use_cpu_xla_flags(environ) == []
  assert environ == {'XLA_FLAGS': mine}


@pytest.mark.parametrize('version', ['0.8.3', '0.7.2'])
def test_a_jaxlib_without_the_flag_gets_none(monkeypatch, version):
  monkeypatch.setattr(process.importlib.metadata, 'version', lambda name: version)
  environ = {}
  assert process.use_cpu_xla_flags(environ) == [] and environ == {}


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='an XLA:CPU flag')
def test_convolutions_compile_to_xla_s_own_on_cpu():
  """conftest set the flag as run.py does: no convolution is left to YNNPACK."""
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  compiled = conv.lower(random((8, 14, 14, 32)), random((3, 3, 32, 64))).compile().as_text()
  assert 'convolution(' in compiled
  assert 'ynn' not in compiled.lower()
