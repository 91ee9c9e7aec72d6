"""The train step: golden values, jit == eager, padding counts nothing, empty steps are no-ops."""

import jax
import numpy as np
import optax
import pytest

from mnist_jax import models
from mnist_jax import optim
from mnist_jax import steps

IMAGE_SHAPE = (2, 2, 1)
NUM_CLASSES = 3

# --- Golden values ------------------------------------------------------------------------
# One train step of configs/mlp.py's model and optimizer shrunk to hidden_sizes=(4,), on 2x2x1
# images with 3 classes, seed 0, on `golden_batch()` below.
#
# When may these be updated? Only after a DELIBERATE change of the numerics, e.g. a different
# initializer, loss, preprocessing (the /255 scaling), optimizer formula, or the way the init key
# is split, or a JAX/Flax upgrade that changes the PRNG or the init key derivation; say so in
# the commit message. Never to make a failing test pass: if these fail and no such change was
# intended, the train step's numerics changed by accident, which is what this test is for.
GOLDEN_INIT_PARAM_SUM = 0.9155979230999947  # sum of all parameters after init
GOLDEN_INIT_PARAM_SUMSQ = 6.870586523620988  # sum of squares of all parameters after init
GOLDEN_LOSS_SUM = 4.803771018981934  # summed cross-entropy over the 4 examples
GOLDEN_ACCURACY_SUM = 1.0  # examples classified right
GOLDEN_COUNT = 4.0
GOLDEN_PARAM_SUM = 0.8845985634252429  # after the step
GOLDEN_PARAM_SUMSQ = 6.851667557375358  # after the step
GOLDEN_RTOL = 1e-5  # float32 math; room for a different CPU/GPU/reduction order.


def golden_batch():
  images = (np.arange(16, dtype=np.uint8).reshape(4, *IMAGE_SHAPE) * 16 + 7).astype(np.uint8)
  return dict(image=images, label=np.array([0, 1, 2, 1], np.int32),
              mask=np.ones(4, np.float32))


@pytest.fixture(scope='module')
def tiny():
  """configs/mlp.py shrunk to hidden_sizes=(4,): its config, model and optimizer.

  Built once per module: the optimizer is part of the jitted state's static structure, so
  reusing the same object lets every test reuse the same compiled steps.
  """
  from conftest import load_config_module
  config = load_config_module().get_config()
  config.model.hidden_sizes = (4,)
  config.cache_dir = 'none'
  return dict(config=config, model=models.build(config.model, NUM_CLASSES),
              tx=optim.create_optimizer(config, total_steps=10), sgd=optax.sgd(1.0))


def make_state(tiny, tx=None, seed=0) -> steps.TrainState:
  """A fresh state each call: the jitted steps donate (delete) the state passed to them."""
  return steps.create_train_state(jax.random.PRNGKey(seed), tiny['model'],
                                  tiny['tx'] if tx is None else tx, IMAGE_SHAPE)


def checksums(params) -> tuple[float, float]:
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(params))]
  return sum(x.sum() for x in leaves), sum((x**2).sum() for x in leaves)


def host(tree):
  """A host copy that survives donation of the device arrays."""
  return jax.tree.map(np.array, jax.device_get(tree))


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  (a_leaves, a_def), (b_leaves, b_def) = jax.tree.flatten(host(a)), jax.tree.flatten(host(b))
  assert a_def == b_def
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(host(a))[0]]
  for name, x, y in zip(names, a_leaves, b_leaves):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=name)


def assert_trees_equal(a, b):
  a_leaves, a_def = jax.tree.flatten(host(a))
  b_leaves, b_def = jax.tree.flatten(host(b))
  assert a_def == b_def
  for x, y in zip(a_leaves, b_leaves):
    np.testing.assert_array_equal(x, y)


def pick(sums):
  return {k: float(sums[k]) for k in ('loss', 'accuracy', 'count')}


def train_chunk(state, batches, **kwargs):
  """The chunk function the tf.data input mode calls (stacked batches, one run)."""
  return steps.make_chunk_fns(steps.stacked).train(state, None, batches, **kwargs)


# --- Golden ---------------------------------------------------------------------------------

def test_init_matches_golden(tiny):
  state = make_state(tiny)
  np.testing.assert_allclose(checksums(state.params),
                             (GOLDEN_INIT_PARAM_SUM, GOLDEN_INIT_PARAM_SUMSQ), rtol=GOLDEN_RTOL)
  assert int(state.step) == 0


def test_train_step_matches_golden(tiny):
  new_state, sums = steps.train_step_jit(make_state(tiny), golden_batch())
  got = pick(sums)
  np.testing.assert_allclose(got['loss'], GOLDEN_LOSS_SUM, rtol=GOLDEN_RTOL)
  assert got['accuracy'] == GOLDEN_ACCURACY_SUM
  assert got['count'] == GOLDEN_COUNT
  np.testing.assert_allclose(checksums(new_state.params), (GOLDEN_PARAM_SUM, GOLDEN_PARAM_SUMSQ),
                             rtol=GOLDEN_RTOL)
  assert int(new_state.step) == 1


def test_jit_and_eager_agree(tiny):
  """`train_step` called directly (op by op, no jit) agrees with the jitted step."""
  jit_state, jit_sums = steps.train_step_jit(make_state(tiny), golden_batch())
  eager_state, eager_sums = steps.train_step(make_state(tiny), golden_batch())
  assert_trees_close(eager_state.params, jit_state.params)
  assert_trees_close(eager_state.opt_state, jit_state.opt_state)
  np.testing.assert_allclose(list(pick(eager_sums).values()), list(pick(jit_sums).values()),
                             rtol=1e-6)
  assert int(eager_state.step) == int(jit_state.step) == 1


def test_eval_step_counts_the_same_as_train_step(tiny):
  state = make_state(tiny)
  eval_sums = pick(steps.eval_step_jit(state, golden_batch()))
  train_sums = pick(steps.train_step_jit(state, golden_batch())[1])  # Loss before the update.
  np.testing.assert_allclose(list(eval_sums.values()), list(train_sums.values()), rtol=1e-6)


def test_loss_is_mean_cross_entropy_by_hand(tiny):
  """The summed loss is the softmax cross-entropy of the model on images/255, by numpy."""
  state = make_state(tiny)
  params = host(state.params)
  batch = golden_batch()
  x = batch['image'].reshape(4, -1).astype(np.float64) / 255.0
  hidden = np.maximum(x @ params['Dense_0']['kernel'] + params['Dense_0']['bias'], 0)
  logits = hidden @ params['Dense_1']['kernel'].T + params['Dense_1']['bias']
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected_loss = -log_probs[np.arange(4), batch['label']].sum()
  expected_correct = (logits.argmax(-1) == batch['label']).sum()
  sums = pick(steps.train_step_jit(state, batch)[1])
  np.testing.assert_allclose(sums['loss'], expected_loss, rtol=1e-5)
  assert sums['accuracy'] == expected_correct


# --- Padding ----------------------------------------------------------------------------------

def padded_batch(garbage_seed=0):
  """The 4 golden examples followed by 4 padded ones: mask 0, garbage images and labels."""
  real = golden_batch()
  rng = np.random.default_rng(garbage_seed)
  garbage_images = rng.integers(0, 256, (4, *IMAGE_SHAPE), dtype=np.uint8)
  garbage_labels = rng.integers(0, NUM_CLASSES, 4).astype(np.int32)
  return dict(image=np.concatenate([real['image'], garbage_images]),
              label=np.concatenate([real['label'], garbage_labels]),
              mask=np.concatenate([real['mask'], np.zeros(4, np.float32)]))


def test_padded_examples_contribute_nothing(tiny):
  """4 real + 4 padded examples give exactly what the 4 real examples give alone."""
  real_state, real_sums = steps.train_step_jit(make_state(tiny), golden_batch())
  pad_state, pad_sums = steps.train_step_jit(make_state(tiny), padded_batch())
  np.testing.assert_allclose(list(pick(pad_sums).values()), list(pick(real_sums).values()),
                             rtol=1e-6)
  assert float(pad_sums['count']) == 4.0
  assert_trees_close(pad_state.params, real_state.params)
  assert_trees_close(pad_state.opt_state, real_state.opt_state)  # RMSprop's v = 0.1 g^2.


def test_padded_examples_give_the_same_gradients(tiny):
  """With SGD(lr=1) the step moves params by exactly -grad: compare grads with an independent
  mean over the real examples, and check the garbage would have changed them if it counted."""
  sgd = tiny['sgd']
  before = host(make_state(tiny, tx=sgd).params)
  grads_of = lambda state: jax.tree.map(lambda b, a: b - np.asarray(a), before,
                                        host(state.params))
  real_grads = grads_of(steps.train_step_jit(make_state(tiny, tx=sgd), golden_batch())[0])
  pad_grads = grads_of(steps.train_step_jit(make_state(tiny, tx=sgd), padded_batch())[0])
  assert_trees_close(pad_grads, real_grads, rtol=1e-5, atol=1e-7)

  # Independently: the gradient of the mean cross-entropy over the 4 real examples.
  model = tiny['model']
  batch = golden_batch()

  def mean_loss(params):
    logits = model.apply({'params': params}, batch['image'].astype(np.float32) / 255.0)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()

  assert_trees_close(real_grads, jax.grad(mean_loss)(before), rtol=1e-5, atol=1e-7)

  # The test can fail: counting the garbage (all masks 1) changes the gradients.
  unmasked = dict(padded_batch(), mask=np.ones(8, np.float32))
  unmasked_grads = grads_of(steps.train_step_jit(make_state(tiny, tx=sgd), unmasked)[0])
  with pytest.raises(AssertionError):
    assert_trees_close(unmasked_grads, real_grads, rtol=1e-5, atol=1e-7)


def stack(*batches):
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def empty_like(batch, seed=1):
  rng = np.random.default_rng(seed)
  return dict(image=rng.integers(0, 256, batch['image'].shape, dtype=np.uint8),
              label=rng.integers(0, NUM_CLASSES, batch['label'].shape).astype(np.int32),
              mask=np.zeros_like(batch['mask']))


def test_empty_step_in_train_chunk_is_a_no_op(tiny):
  """An all-padding step (as chunk_plan appends) changes nothing: params, opt_state, step, rng.

  Starts from a state one step in, so RMSprop's second moment is non-zero and would decay.
  """
  state, _ = steps.train_step_jit(make_state(tiny), golden_batch())
  before = host(state)
  out = train_chunk(state, stack(empty_like(golden_batch())))
  after, totals = out[0], out[1]
  assert_trees_equal(after.params, before.params)
  assert_trees_equal(after.opt_state, before.opt_state)
  assert int(after.step) == int(before.step) == 1
  assert_trees_equal(after, before)  # Every leaf of the state, the RNG included.
  assert pick(totals) == dict(loss=0.0, accuracy=0.0, count=0.0)


def test_unguarded_chunk_without_empty_steps_equals_the_guarded_one(tiny):
  """guard_empty_steps=False (chunks with a real example at every step) computes the same."""
  chunk = stack(padded_batch(garbage_seed=4), dict(padded_batch(garbage_seed=5),
                                                    mask=np.ones(8, np.float32)))
  guarded = train_chunk(make_state(tiny), chunk)
  unguarded = train_chunk(make_state(tiny), chunk, guard_empty_steps=False)
  assert_trees_equal(host(unguarded[0]), host(guarded[0]))
  assert pick(unguarded[1]) == pick(guarded[1])


def test_without_the_guard_an_empty_step_would_move_the_optimizer(tiny):
  """Why the guard exists: unguarded, an empty step decays RMSprop's second moment."""
  state, _ = steps.train_step_jit(make_state(tiny), golden_batch())
  before = host(state)
  after = host(train_chunk(state, stack(empty_like(golden_batch())),
                                 guard_empty_steps=False)[0])
  assert_trees_equal(after.params, before.params)  # A zero gradient moves no parameter...
  assert int(after.step) == 2  # ...but the step counts,
  nu_before, nu_after = (jax.tree.leaves(s.opt_state) for s in (before, after))
  assert any(np.any(a != b) for a, b in zip(nu_after, nu_before))  # and the moment decays.


def test_train_chunk_with_trailing_empty_steps_equals_the_real_steps(tiny):
  """[a, b, empty, empty] ends where [a, b] does, and where two single steps do."""
  batch_a = padded_batch(garbage_seed=4)  # 4 real + 4 padded.
  batch_b = dict(padded_batch(garbage_seed=5), mask=np.ones(8, np.float32))  # 8 real.
  out = train_chunk(make_state(tiny), stack(batch_a, batch_b))
  ref_state, ref_totals = host(out[0]), pick(out[1])
  out = train_chunk(make_state(tiny),
                          stack(batch_a, batch_b, empty_like(batch_a, 2), empty_like(batch_a, 3)))
  padded_state, padded_totals = host(out[0]), pick(out[1])
  assert_trees_close(padded_state.params, ref_state.params)
  assert_trees_close(padded_state.opt_state, ref_state.opt_state)
  assert int(padded_state.step) == int(ref_state.step) == 2
  np.testing.assert_allclose(list(padded_totals.values()), list(ref_totals.values()), rtol=1e-6)
  assert padded_totals['count'] == 12.0  # 4 + 8 real examples.

  state, sums_a = steps.train_step_jit(make_state(tiny), batch_a)
  state, sums_b = steps.train_step_jit(state, batch_b)
  assert_trees_close(padded_state.params, state.params, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(padded_totals['loss'], float(sums_a['loss'] + sums_b['loss']),
                             rtol=1e-5)


def test_train_chunk_resident_equals_train_chunk(tiny):
  """The device mode's gather feeds the same batches as stacking them on the host."""
  rng = np.random.default_rng(0)
  data = dict(image=rng.integers(0, 256, (10, *IMAGE_SHAPE), dtype=np.uint8),
              label=rng.integers(0, NUM_CLASSES, 10).astype(np.int32))
  chunk = dict(index=np.array([[3, 1, 4, 1], [5, 9, 0, 0]], np.int32),
               mask=np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float32))
  batches = dict(image=data['image'][chunk['index']], label=data['label'][chunk['index']],
                 mask=chunk['mask'])
  out_host = train_chunk(make_state(tiny), batches)
  out_dev = steps.make_chunk_fns(steps.gather).train(make_state(tiny), data, chunk)
  assert_trees_close(out_dev[0].params, out_host[0].params)
  np.testing.assert_allclose(list(pick(out_dev[1]).values()), list(pick(out_host[1]).values()),
                             rtol=1e-6)
  assert float(out_dev[1]['count']) == 6.0
