"""Layers shared by the models: drop-in replacements for Flax layers that are slow on XLA:CPU.

Which implementation runs where is chosen when the function is traced, by
`jax.default_backend()`:

| layer | on CPU | on GPU / TPU |
| --- | --- | --- |
| `Logits` | dense with the kernel stored [classes, features] | the same |
| `max_pool` | window == strides, 'VALID': a reshape and a max; otherwise `nn.max_pool` | `nn.max_pool` |
| `Conv` | 2-D, stride 1, undilated, ungrouped: see `conv_general_dilated`; otherwise XLA's | XLA's |

On CPU the convolutions also need one XLA flag, set for the whole process before JAX's backend
starts (`infra.process.use_cpu_xla_flags`, called by run.py, the benchmarks and the tests).

Each computes what the Flax layer it replaces computes, values and gradients, with the same
parameter names, shapes and initial values (tests/unit/test_layers.py).
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np


def _on_cpu() -> bool:
  return jax.default_backend() == 'cpu'


class Logits(nn.Module):
  """Dense to the class logits, like `nn.Dense`, with its kernel stored [classes, features].

  Same function and, under the same name, the same initial values as `nn.Dense(num_classes)`:
  the kernel is drawn [features, classes] (so fan-in/fan-out initializers see the usual shape)
  and stored transposed. Why: XLA:CPU computes the weight gradient of a narrow [features, 10]
  kernel on a slow path; the [10, features] layout made the notebook's MLP train ~10% faster
  per epoch on a 2-core CPU (benchmarks/train_speed.py). Not measured on a GPU or TPU, where
  either layout is one matrix multiply.
  """
  features: int
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = jnp.float32  # The computation's; the parameters stay float32.

  @nn.compact
  def __call__(self, x_BxD: jax.Array) -> jax.Array:
    kernel_CxD = self.param(
        'kernel', lambda rng: self.kernel_init(rng, (x_BxD.shape[-1], self.features)).T)
    bias_C = self.param('bias', self.bias_init, (self.features,))
    x_BxD, kernel_CxD, bias_C = (a.astype(self.dtype) for a in (x_BxD, kernel_CxD, bias_C))
    return jnp.einsum('bd,cd->bc', x_BxD, kernel_CxD) + bias_C[None, :]


# --- Max pooling ------------------------------------------------------------------------------


def max_pool(inputs: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding='VALID') -> jax.Array:
  """`nn.max_pool`, with the same arguments, values and gradients.

  On CPU, windows that tile the input (strides == window_shape, 'VALID') are a reshape to
  [..., H/2, 2, W/2, 2, C] and a max. XLA:CPU lowers `nn.max_pool`'s reduce-window, and its
  gradient (select-and-scatter, expanded into iotas and a scatter), to loops that took about
  half of the CNN's train step (benchmarks/profile_cnn.py). The gradient goes to the first
  maximum of each window in row-major order, as select-and-scatter's does.
  """
  window = tuple(window_shape)
  if (_on_cpu() and strides is not None and tuple(strides) == window and padding == 'VALID'
      and inputs.ndim >= len(window) + 2
      and all(0 < k <= n for k, n in zip(window, inputs.shape[-len(window) - 1:-1]))):
    return _tiled_max(inputs, window)
  return nn.max_pool(inputs, window, strides, padding)


def _tiles(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
  """x [*batch, *spatial, C] cropped to whole windows, as [*batch, n1, k1, n2, k2, ..., C]."""
  spatial = x.shape[-len(window) - 1:-1]
  lead = x.ndim - len(window) - 1
  counts = [n // k for n, k in zip(spatial, window)]
  x = x[(slice(None),) * lead + tuple(slice(0, c * k) for c, k in zip(counts, window))]
  split = [d for c, k in zip(counts, window) for d in (c, k)]
  return x.reshape(x.shape[:lead] + tuple(split) + x.shape[-1:])


def _window_axes(x: jax.Array, window: tuple[int, ...]) -> tuple[int, ...]:
  lead = x.ndim - len(window) - 1
  return tuple(lead + 2 * i + 1 for i in range(len(window)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
  return jnp.max(_tiles(x, window), axis=_window_axes(x, window))


def _tiled_max_fwd(x, window):
  y = _tiled_max(x, window)
  return y, (x, y)


def _tiled_max_bwd(window, residuals, g):
  """The gradient to the first maximum of each window, row-major, as select-and-scatter's.

  Elementwise per window position (no reduction), then interleaved back into the input's
  layout: one pass over the input, which XLA fuses into a loop.
  """
  x, y = residuals
  tiles = _tiles(x, window)
  axes = _window_axes(x, window)
  parts, earlier = [], None
  for position in np.ndindex(*window):
    index = [slice(None)] * tiles.ndim
    for axis, i in zip(axes, position):
      index[axis] = i
    is_max = tiles[tuple(index)] == y
    parts.append(jnp.where(is_max if earlier is None else is_max & ~earlier, g, 0))
    earlier = is_max if earlier is None else earlier | is_max
  # [*lead, n1, n2, ..., C, k1, k2, ...] -> [*lead, n1, k1, n2, k2, ..., C] -> input layout.
  lead, n = x.ndim - len(window) - 1, len(window)
  dx = jnp.stack(parts, axis=-1).reshape(y.shape + window)
  dx = dx.transpose([*range(lead), *[a for i in range(n) for a in (lead + i, y.ndim + i)],
                     y.ndim - 1])
  dx = dx.reshape(x.shape[:lead] + tuple(c * k for c, k in zip(y.shape[lead:-1], window))
                  + x.shape[-1:]).astype(x.dtype)
  cropped = [(0, s - d) for s, d in zip(x.shape[lead:-1], dx.shape[lead:-1])]
  return (jnp.pad(dx, [(0, 0)] * lead + cropped + [(0, 0)]),)


_tiled_max.defvjp(_tiled_max_fwd, _tiled_max_bwd)


# --- Convolution ------------------------------------------------------------------------------

_NHWC = ('NHWC', 'HWIO', 'NHWC')
# Up to this many input channels, the forward pass and the weight gradient are matmuls with the
# input's patches (kh*kw*C columns, few); above it, XLA's convolution and a matmul per offset.
_FEW_CHANNELS = 4


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None) -> jax.Array:
  """`lax.conv_general_dilated`, with a faster gradient on CPU for plain 2-D convolutions.

  The fast path takes 2-D NHWC/HWIO convolutions with stride 1, no dilation and one feature
  group (what `nn.Conv` makes by default); everything else, and every backend but the CPU, is
  `lax.conv_general_dilated` itself. On the fast path:
  - the forward pass and the input gradient are XLA's convolutions (the input gradient written
    as a plain convolution on the flipped kernel, which XLA:CPU keeps on its fast library);
  - the weight gradient is matmuls of the output gradient [Cout, B*H*W] with the input shifted
    by each kernel offset, instead of XLA's convolution with batch and features swapped, which
    XLA:CPU ran ~3x slower than the forward convolution (benchmarks/profile_cnn.py);
  - with at most `_FEW_CHANNELS` input channels (a first layer on images), the forward pass and
    the weight gradient are one matmul each with the input's patches [B*H*W, kh*kw*C].
  """
  args = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
              rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
              feature_group_count=feature_group_count, batch_group_count=batch_group_count,
              precision=precision, preferred_element_type=preferred_element_type)
  pads = _fast_path_pads(lhs, rhs, **args)
  if pads is None:
    return lax.conv_general_dilated(lhs, rhs, **args)
  return _conv_cpu(lhs, rhs, pads, precision)


class Conv(nn.Conv):
  """`nn.Conv` (same fields, parameters and initial values) on `conv_general_dilated` above."""
  conv_general_dilated: Callable | None = conv_general_dilated


def _fast_path_pads(lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count, batch_group_count, precision,
                    preferred_element_type) -> tuple[tuple[int, int], ...] | None:
  """The explicit (low, high) padding of a convolution the CPU path takes, else None."""
  del precision
  if not _on_cpu() or lhs.ndim != 4 or rhs.ndim != 4:
    return None
  if (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return None
  ones = (1, 1)
  if (tuple(window_strides) != ones or tuple(lhs_dilation or ones) != ones
      or tuple(rhs_dilation or ones) != ones or feature_group_count != 1
      or batch_group_count != 1 or preferred_element_type is not None
      or lhs.dtype != rhs.dtype or not jnp.issubdtype(lhs.dtype, jnp.floating)
      or lhs.shape[3] != rhs.shape[2]):
    return None
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], ones, padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if any(not 0 <= p < k for (lo, hi), k in zip(pads, rhs.shape[:2]) for p in (lo, hi)):
    return None
  if any(n + lo + hi < k for n, (lo, hi), k in zip(lhs.shape[1:3], pads, rhs.shape[:2])):
    return None
  return pads


def _xla_conv(x, w, pads, precision):
  return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_NHWC,
                                  precision=precision)


def _shifts(x, kernel_hw, pads):
  """The padded input's windows at each kernel offset, row-major: [B, Ho, Wo, C] each."""
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  ho, wo = xp.shape[1] - kernel_hw[0] + 1, xp.shape[2] - kernel_hw[1] + 1
  return [xp[:, i:i + ho, j:j + wo, :] for i in range(kernel_hw[0]) for j in range(kernel_hw[1])]


def _input_grad(g, w, pads, precision):
  """The transposed convolution, written as a plain one on the flipped, transposed kernel.

  JAX's own rule expresses it with the kernel's dimension numbers swapped; inside a lax.scan
  loop XLA:CPU then kept that layout and ran it outside its fast convolution library.
  """
  kh, kw = w.shape[:2]
  w_flipped = jnp.flip(jnp.swapaxes(w, 2, 3), (0, 1))
  back = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]), (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
  return _xla_conv(g, w_flipped, back, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_cpu(x, w, pads, precision):
  return _conv_cpu_fwd(x, w, pads, precision)[0]


def _conv_cpu_fwd(x, w, pads, precision):
  kh, kw, cin, cout = w.shape
  if cin > _FEW_CHANNELS:
    return _xla_conv(x, w, pads, precision), (x, w)
  # Few input channels: one matmul of the patches [B*Ho*Wo, kh*kw*C] (small here), kept for
  # the weight gradient. A matmul's result is computed once, where XLA would fuse a cheap
  # convolution into each of its consumers (the activation, the pooling, their gradients).
  shifts = _shifts(x, (kh, kw), pads)
  patches_NxK = jnp.concatenate([s.reshape(-1, cin) for s in shifts], axis=1)
  y = jnp.matmul(patches_NxK, w.reshape(-1, cout), precision=precision)
  return y.reshape(shifts[0].shape[:3] + (cout,)), (patches_NxK, w)


def _conv_cpu_bwd(pads, precision, residuals, g):
  x_or_patches, w = residuals
  kh, kw, cin, cout = w.shape
  g_OxN = g.reshape(-1, cout).T
  if cin <= _FEW_CHANNELS:
    dw_OxK = jnp.matmul(g_OxN, x_or_patches, precision=precision)
    dw = dw_OxK.T.reshape(w.shape)
  else:  # One matmul per kernel offset: [Cout, B*Ho*Wo] x [B*Ho*Wo, C].
    dw_KxOxC = jnp.stack([jnp.matmul(g_OxN, s.reshape(-1, cin), precision=precision)
                          for s in _shifts(x_or_patches, (kh, kw), pads)])
    dw = dw_KxOxC.transpose(0, 2, 1).reshape(w.shape)
  return _input_grad(g, w, pads, precision), dw


_conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)
