"""Augmentation ops: what each computes, that they are pure functions of (rng, images), and
how a spec string is parsed and checked. The step side (an rng from (seed, step), training
batches only) is tested in test_losses_metrics.py and end to end in test_model_state.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax import augment

KEY = jax.random.PRNGKey(0)


def images(b=16, h=12, w=12, c=1, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (b, h, w, c))


def test_shift_moves_each_image_by_whole_pixels_within_range():
  x = np.asarray(images())
  out = np.asarray(augment.shift(KEY, jnp.asarray(x), pixels=2))
  moves = set()
  for original, shifted in zip(x, out):
    found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
             if np.array_equal(shifted, _shifted(original, dy, dx))]
    assert len(found) == 1  # Random content: exactly one offset explains the output.
    moves.add(found[0])
  assert len(moves) > 5  # Independent per example (16 draws of 25 offsets).


def _shifted(image, dy, dx):
  """image moved down by dy and right by dx, zero-filled."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
  return padded[2 - dy:2 - dy + h, 2 - dx:2 - dx + w]


def test_shift_by_0_is_the_identity():
  x = images()
  np.testing.assert_array_equal(augment.shift(KEY, x, pixels=0), x)


def test_warp_with_the_identity_matrix_is_the_identity():
  x = images()
  out = augment._warp(x, jnp.broadcast_to(jnp.eye(2), (16, 2, 2)))  # pylint: disable=protected-access
  np.testing.assert_allclose(out, x, atol=1e-6)


def test_warp_by_a_quarter_turn_is_rot90():
  x = images(h=9, w=9)
  quarter = jnp.array([[0.0, -1.0], [1.0, 0.0]])  # (y, x) -> (-x, y) about the centre.
  out = np.asarray(augment._warp(x, jnp.broadcast_to(quarter, (16, 2, 2))))  # pylint: disable=protected-access
  turned = [np.rot90(np.asarray(image), k, axes=(0, 1)) for image in x for k in (1, 3)]
  for i, image in enumerate(out):
    assert any(np.allclose(image, t, atol=1e-5) for t in turned[2 * i:2 * i + 2])


def test_rotate_keeps_the_centre_and_stays_in_range():
  x = jnp.zeros((8, 11, 11, 1)).at[:, 5, 5, 0].set(1.0)  # One bright pixel at the centre.
  out = augment.rotate(KEY, x, degrees=30.0)
  np.testing.assert_allclose(out[:, 5, 5, 0], 1.0, atol=1e-5)
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0 + 1e-6


def test_affine_zoom_scales_distances_from_the_centre():
  """scale=0.5 with no rotation: a pixel 4 from the centre lands 2 to 6 from it."""
  x = jnp.zeros((32, 11, 11, 1)).at[:, 5, 9, 0].set(1.0)
  out = np.asarray(augment.affine(KEY, x, degrees=0.0, scale=0.5))
  columns = np.argmax(out[:, 5, :, 0], axis=-1)
  assert set(columns) <= set(range(7, 11)) and len(set(columns)) > 1


def test_erase_sets_one_rectangle_of_bounded_area():
  x = jnp.ones((64, 20, 20, 1))
  out = np.asarray(augment.erase(KEY, x, probability=1.0, min_area=0.05, max_area=0.2))
  for image in out[..., 0]:
    rows, cols = np.nonzero(image == 0)
    assert rows.size, 'every image is erased with probability 1'
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert box == rows.size  # A filled rectangle.
    assert 0.02 * 400 <= rows.size <= 0.25 * 400  # The area, give or take the rounding.


def test_erase_probability():
  x = jnp.ones((400, 8, 8, 1))
  assert augment.erase(KEY, x, probability=0.0).min() == 1.0
  erased = (np.asarray(augment.erase(KEY, x, probability=0.5)) == 0).any(axis=(1, 2, 3))
  assert 0.4 < erased.mean() < 0.6


@pytest.mark.parametrize('spec', ['shift(2)', 'rotate(15)', 'affine(10, 0.1, 5)', 'erase(0.5)',
                                  'shift(1)|rotate(5)|erase(probability=0.3)'])
def test_ops_are_pure_functions_of_the_rng(spec):
  fn = jax.jit(augment.build(spec))
  x = images()
  np.testing.assert_array_equal(fn(KEY, x), fn(KEY, x))
  assert not np.array_equal(fn(KEY, x), fn(jax.random.PRNGKey(1), x))
  assert fn(KEY, x).shape == x.shape and fn(KEY, x).dtype == jnp.float32


def test_empty_spec_is_the_identity():
  x = images()
  assert augment.parse('') == []
  assert augment.build('')(KEY, x) is x


def test_ops_of_a_spec_draw_independent_keys():
  """Op i of a spec draws from the key folded with i: each op has its own randomness."""
  x = images()
  twice = augment.build('shift(1)|shift(1)')(KEY, x)
  once = augment.shift(jax.random.fold_in(KEY, 0), x, 1)
  np.testing.assert_array_equal(twice, augment.shift(jax.random.fold_in(KEY, 1), once, 1))
  same_key = augment.shift(jax.random.fold_in(KEY, 0), once, 1)
  assert not np.array_equal(twice, same_key)


def test_parse():
  assert augment.parse('shift(2)|rotate(degrees=10)| erase ') == [
      ('shift', (2,), {}), ('rotate', (), {'degrees': 10}), ('erase', (), {})]


@pytest.mark.parametrize('spec, message', [
    ('blur(3)', "unknown augmentation 'blur'"),
    ('shift(2', 'is not an op call'),
    ('shift(pixels=x)', 'is not an op call'),
    ('shift(1, 2)', 'too many positional arguments'),
    ('rotate(angle=3)', "unexpected keyword argument 'angle'"),
    ('os.system("x")', 'is not an op call'),
])
def test_bad_specs_are_refused_by_name(spec, message):
  with pytest.raises(ValueError, match=message):
    augment.check(spec)


@pytest.mark.parametrize('spec', ['shift(-1)', 'shift(1.5)', 'affine(scale=1.0)',
                                  'rotate(200)', 'erase(1.5)', 'erase(min_area=0.5, max_area=0.1)'])
def test_bad_arguments_are_refused_when_checked(spec):
  with pytest.raises(ValueError, match=spec.split('(')[0]):
    augment.check(spec)


def test_preprocess_scales_to_unit_range():
  x = jnp.array([0, 51, 255], jnp.uint8)
  np.testing.assert_allclose(augment.preprocess(x), [0.0, 0.2, 1.0])
  assert augment.preprocess(x).dtype == jnp.float32
  assert math.isclose(float(augment.preprocess(jnp.uint8(255))), 1.0)
