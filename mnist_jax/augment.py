"""Data augmentation on the device: pure functions of (rng, images), chosen by name.

`config.augment = 'shift(2)|rotate(10)|erase(0.5)'` applies to every training batch, in that
order, a random shift of up to 2 pixels, a random rotation of up to 10 degrees and, with
probability 0.5 per example, random erasing; every example draws its own values. '' (the
notebook's config) turns augmentation off. Evaluation never augments.

An op is a function `(rng, images_BxHxWxC, *args) -> images_BxHxWxC` registered with `@op`;
its images are float32 in [0, 1] (after `preprocess`). The spec names ops and their arguments
as Python literals, like big_vision's preprocessing strings. The train step derives the rng
from (seed, step), so a run is reproducible and a resumed run stays bit-identical. An op
checks its arguments with `_require`, which runs when the spec is validated, before any data
is loaded.

Adding an augmentation means adding a function here and naming it in `config.augment`.
"""

import ast
import functools
import inspect
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Op = Callable[..., jax.Array]
OPS: dict[str, Op] = {}


def op(fn: Op) -> Op:
  """Registers `fn` under its name, for `config.augment`."""
  OPS[fn.__name__] = fn
  return fn


def preprocess(image_BxHxWxC: jax.Array) -> jax.Array:
  """uint8 pixels to float32 in [0, 1]: what every model sees, in training and evaluation."""
  return image_BxHxWxC.astype(jnp.float32) / 255.0


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _grid_HxW(height: int, width: int) -> tuple[jax.Array, jax.Array]:
  return jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing='ij')


@op
def shift(rng: jax.Array, images_BxHxWxC: jax.Array, pixels: int = 2) -> jax.Array:
  """Moves each image by a random whole number of pixels in [-pixels, pixels], each axis.

  What moves out of the frame is lost; what comes in is 0 (MNIST's background).
  """
  _require(isinstance(pixels, int) and pixels >= 0, 'shift(pixels): an integer >= 0')
  b, h, w, c = images_BxHxWxC.shape
  # Half the frame or more, and a shift can move the whole image out: a blank example.
  _require(2 * pixels < min(h, w) or min(h, w) >= ANY_IMAGE_SHAPE[0],
           f'shift(pixels): at most {(min(h, w) - 1) // 2} for {h}x{w} images (below half '
           'the frame: a larger shift leaves blank images)')
  offsets_Bx2 = jax.random.randint(rng, (b, 2), 0, 2 * pixels + 1)
  padded = jnp.pad(images_BxHxWxC, ((0, 0), (pixels, pixels), (pixels, pixels), (0, 0)))
  crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets_Bx2)


@op
def affine(rng: jax.Array, images_BxHxWxC: jax.Array, degrees: float = 10.0,
           scale: float = 0.1, shear_degrees: float = 0.0) -> jax.Array:
  """A random rotation in [-degrees, degrees], zoom in [1 - scale, 1 + scale] and shear in
  [-shear_degrees, shear_degrees] about the image centre, sampled bilinearly, 0 outside."""
  _require(0 <= degrees <= 180, 'affine(degrees): a number in [0, 180]')
  _require(0 <= scale < 1, 'affine(scale): a number in [0, 1)')
  _require(0 <= shear_degrees < 90, 'affine(shear_degrees): a number in [0, 90)')
  b = images_BxHxWxC.shape[0]
  angle_rng, scale_rng, shear_rng = jax.random.split(rng, 3)
  uniform = lambda key, limit: jax.random.uniform(key, (b,), minval=-limit, maxval=limit)
  angle_B = uniform(angle_rng, math.radians(degrees))
  zoom_B = 1.0 + uniform(scale_rng, scale)
  shear_B = uniform(shear_rng, math.radians(shear_degrees))
  cos, sin = jnp.cos(angle_B), jnp.sin(angle_B)
  # Output pixel p samples the input at A^-1 p: rotate back, then unshear, then unzoom.
  rotate_Bx2x2 = jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], -2)
  shear_Bx2x2 = jnp.stack([jnp.stack([jnp.ones_like(shear_B), -jnp.tan(shear_B)], -1),
                           jnp.stack([jnp.zeros_like(shear_B), jnp.ones_like(shear_B)], -1)], -2)
  inverse_Bx2x2 = (shear_Bx2x2 @ rotate_Bx2x2) / zoom_B[:, None, None]
  return _warp(images_BxHxWxC, inverse_Bx2x2)


@op
def rotate(rng: jax.Array, images_BxHxWxC: jax.Array, degrees: float = 10.0) -> jax.Array:
  """A random rotation in [-degrees, degrees] about the centre (an `affine` without zoom)."""
  _require(0 <= degrees <= 180, 'rotate(degrees): a number in [0, 180]')
  return affine(rng, images_BxHxWxC, degrees=degrees, scale=0.0)


def _warp(images_BxHxWxC: jax.Array, inverse_Bx2x2: jax.Array) -> jax.Array:
  """Each output pixel samples its image at inverse @ (pixel - centre) + centre, bilinearly."""
  _, h, w, _ = images_BxHxWxC.shape
  yy, xx = _grid_HxW(h, w)
  centre = jnp.array([(h - 1) / 2, (w - 1) / 2])
  offsets_2xP = jnp.stack([yy.ravel(), xx.ravel()]) - centre[:, None]

  def one(image_HxWxC, inverse_2x2):
    source_2xP = inverse_2x2 @ offsets_2xP + centre[:, None]
    sample = lambda channel_HxW: jax.scipy.ndimage.map_coordinates(
        channel_HxW, list(source_2xP), order=1, mode='constant', cval=0.0)
    return jax.vmap(sample, in_axes=-1, out_axes=-1)(image_HxWxC).reshape(image_HxWxC.shape)

  return jax.vmap(one)(images_BxHxWxC, inverse_Bx2x2)


@op
def erase(rng: jax.Array, images_BxHxWxC: jax.Array, probability: float = 0.5,
          min_area: float = 0.02, max_area: float = 0.2, value: float = 0.0) -> jax.Array:
  """Random erasing: with `probability`, a rectangle of a random area (a fraction in
  [min_area, max_area] of the image) and aspect ratio (in [0.3, 3.3]) is set to `value`."""
  _require(0 <= probability <= 1, 'erase(probability): a number in [0, 1]')
  _require(0 < min_area <= max_area <= 1, 'erase(min_area, max_area): 0 < min <= max <= 1')
  b, h, w, _ = images_BxHxWxC.shape
  keys = jax.random.split(rng, 5)
  apply_B = jax.random.bernoulli(keys[0], probability, (b,))
  area_B = jax.random.uniform(keys[1], (b,), minval=min_area, maxval=max_area) * h * w
  ratio_B = jnp.exp(jax.random.uniform(keys[2], (b,), minval=math.log(0.3),
                                       maxval=math.log(1 / 0.3)))
  height_B = jnp.clip(jnp.round(jnp.sqrt(area_B * ratio_B)), 1, h)
  width_B = jnp.clip(jnp.round(jnp.sqrt(area_B / ratio_B)), 1, w)
  top_B = jnp.floor(jax.random.uniform(keys[3], (b,)) * (h - height_B + 1))
  left_B = jnp.floor(jax.random.uniform(keys[4], (b,)) * (w - width_B + 1))
  yy, xx = _grid_HxW(h, w)
  inside = lambda grid, start, size: ((grid[None] >= start[:, None, None])
                                      & (grid[None] < (start + size)[:, None, None]))
  erased_BxHxW = (apply_B[:, None, None] & inside(yy, top_B, height_B)
                  & inside(xx, left_B, width_B))
  return jnp.where(erased_BxHxW[..., None], jnp.float32(value), images_BxHxWxC)


# --- Specs ------------------------------------------------------------------------------------

def parse(spec: str) -> list[tuple[str, tuple, dict]]:
  """'shift(2)|erase(probability=0.3)' -> [('shift', (2,), {}), ('erase', (), {...})].

  Raises ValueError naming the piece that is not an op with literal arguments.
  """
  ops = []
  for piece in filter(None, (p.strip() for p in spec.split('|'))):
    try:
      call = ast.parse(piece if '(' in piece else f'{piece}()', mode='eval').body
      if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
        raise ValueError
      args = tuple(ast.literal_eval(a) for a in call.args)
      kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError):
      raise ValueError(f'{piece!r} is not an op call like shift(2)') from None
    name = call.func.id
    if name not in OPS:
      raise ValueError(f'unknown augmentation {name!r}; known: {", ".join(sorted(OPS))}')
    try:
      inspect.signature(OPS[name]).bind(None, None, *args, **kwargs)
    except TypeError as e:
      raise ValueError(f'{piece!r}: {e}') from None
    ops.append((name, args, kwargs))
  return ops


def build(spec: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The spec's ops composed into one `(rng, images) -> images`; '' is the identity."""
  ops = [functools.partial(_call, OPS[name], args, kwargs) for name, args, kwargs in parse(spec)]

  def apply(rng: jax.Array, images_BxHxWxC: jax.Array) -> jax.Array:
    for i, fn in enumerate(ops):
      images_BxHxWxC = fn(jax.random.fold_in(rng, i), images_BxHxWxC)
    return images_BxHxWxC

  return apply


def _call(fn: Op, args: tuple, kwargs: dict, rng: jax.Array, images: jax.Array) -> jax.Array:
  return fn(rng, images, *args, **kwargs)


# The shape `check` assumes where the images' size is not known yet: large enough for every
# size-dependent argument check to pass (they run again with the real shape).
ANY_IMAGE_SHAPE = (4096, 4096, 1)


def check(spec: str, image_shape: tuple[int, ...] = (28, 28, 1)) -> None:
  """Parses the spec and traces it once on abstract images, so bad arguments fail now."""
  fn = build(spec)
  try:
    jax.eval_shape(fn, jax.ShapeDtypeStruct((2,), jnp.uint32),
                   jax.ShapeDtypeStruct((2, *image_shape), jnp.float32))
  except ValueError as e:  # Only the op's own words, not JAX's note on filtered frames.
    raise ValueError(str(e).splitlines()[0]) from None
