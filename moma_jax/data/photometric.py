"""MoCo v3 / BYOL photometric augmentations on the accelerator, batched, inside the train step.

The host pipeline (augment.py) makes each view's geometry (decode, random resized crop, flip) and
hands uint8 views to the device together with each example's augmentation seed (``AUG_SEED``, a
pure function of (run seed, process, stream position), like every host random choice). The train
step then applies the photometric part here, with ``jax.random`` keys made from those seeds:

  colour jitter (brightness, contrast, saturation, hue; torchvision's ColorJitter semantics, its
  four operations in a random order) with probability ``jitter_prob``; grayscale (ITU-R 601
  luma) with ``grayscale_prob``; Gaussian blur (sigma uniform in ``blur_sigma`` pixels, reflect
  padding, 2 ceil(3 sigma_max) + 1 taps) with ``blur_prob``; solarisation at 0.5 with
  ``solarize_prob``.

Why on the device: these per-pixel ops cost ~3 ms per 224 px image on a host core (hue ~1 ms,
blur ~1.2 ms), which capped the host at ~200 MOMA views / s / core; on an accelerator (or XLA on
the CPU, vectorised over the batch) they are a rounding error next to the model. The result is the
same for every sharding and every batch composition (each example's key comes from its own seed)
and a resumed run draws the same augmentations as an uninterrupted one. ``data.photometric =
'host'`` keeps the TensorFlow versions in the input pipeline (augment.photometric), the same
operations with the host's stateless TF random numbers; 'auto' (the default) picks the device on
GPU / TPU and the host on a CPU backend (see :func:`on_device`).

No library offers these with per-example parameters in JAX (dm_pix has the single-image ops but
no torchvision-order jitter or per-example blur sigma), hence the code below.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from moma_jax.data.augment import ViewSpec

AUG_SEED = 'aug_seed'  # batch key: uint32 [B, 2] per-example seeds from the host pipeline
_LUMA = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale / PIL convert('L')


# Every op below is elementwise over pixels (channels picked by index, max / min / luma written out
# over the three channels rather than reduced over an axis): XLA then fuses a whole jitter
# position into one pass over the image. Axis reductions, stacks and .at[].set() each cost a
# pass of their own; on a TPU v5e at 1,024 images of 224 px per chip they made the augmentation
# 56 GB of HBM traffic per step (moma_jax/plan.py, docs/tpu.md).


def _channels(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  return x[..., 0], x[..., 1], x[..., 2]


def grayscale(x: jax.Array) -> jax.Array:
  """[..., 3] -> [..., 1] luma."""
  r, g, b = _channels(x)
  return (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2])[..., None]


def brightness(x: jax.Array, f: jax.Array) -> jax.Array:
  return jnp.clip(x * f, 0.0, 1.0)


def contrast(x: jax.Array, f: jax.Array) -> jax.Array:
  """Blend with the image's mean luma (torchvision adjust_contrast); x: one image [H, W, 3]."""
  m = jnp.mean(grayscale(x))
  return jnp.clip((x - m) * f + m, 0.0, 1.0)


def saturation(x: jax.Array, f: jax.Array) -> jax.Array:
  g = grayscale(x)
  return jnp.clip((x - g) * f + g, 0.0, 1.0)


def _hsv(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  r, g, b = _channels(x)
  v = jnp.maximum(jnp.maximum(r, g), b)
  c = v - jnp.minimum(jnp.minimum(r, g), b)
  s = jnp.where(v > 0, c / jnp.where(v > 0, v, 1.0), 0.0)
  safe = jnp.where(c > 0, c, 1.0)
  h = jnp.where(
    v == r, (g - b) / safe, jnp.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
  )
  h = jnp.where(c > 0, (h / 6.0) % 1.0, 0.0)
  return h, s, v


def _rgb(h: jax.Array, s: jax.Array, v: jax.Array) -> jax.Array:
  k = lambda n: (n + h * 6.0) % 6.0  # noqa: E731
  f = lambda n: v - v * s * jnp.clip(jnp.minimum(k(n), 4.0 - k(n)), 0.0, 1.0)  # noqa: E731
  return jnp.stack([f(5.0), f(3.0), f(1.0)], axis=-1)


def rgb_to_hsv(x: jax.Array) -> jax.Array:
  return jnp.stack(_hsv(x), axis=-1)


def hsv_to_rgb(x: jax.Array) -> jax.Array:
  return _rgb(*_channels(x))


def hue(x: jax.Array, delta: jax.Array) -> jax.Array:
  """Rotates the hue by ``delta`` turns (tf.image.adjust_hue, torchvision adjust_hue)."""
  h, s, v = _hsv(x)
  return jnp.clip(_rgb((h + delta) % 1.0, s, v), 0.0, 1.0)


def jitter_position(x: jax.Array, op: jax.Array, factors: tuple[jax.Array, ...]) -> jax.Array:
  """One position of ColorJitter's random order: operation ``op`` (0 brightness, 1 contrast,
  2 saturation, 3 hue) with ``factors`` = (brightness, contrast, saturation, hue delta).

  The three blends are one formula, clip((x - centre) * f + centre), with centre 0, the image's
  mean luma or each pixel's luma: only the chosen one is paid for, where a select over the four
  operations computed all four (vmapped, ``lax.switch`` computes every branch too)."""
  fb, fc, fs, fh = factors
  luma = grayscale(x)
  centre = jnp.where(op == 1, jnp.mean(luma), jnp.where(op == 2, luma, 0.0))
  f = jnp.where(op == 0, fb, jnp.where(op == 1, fc, fs))
  blended = jnp.clip((x - centre) * f + centre, 0.0, 1.0)
  return jnp.where(op == 3, hue(x, fh), blended)


def gaussian_blur(x: jax.Array, sigma: jax.Array, sigma_max: float) -> jax.Array:
  """Separable Gaussian blur of one image [H, W, C] with reflect padding (as augment.gaussian_blur:
  2 ceil(3 sigma_max) + 1 taps whatever the drawn ``sigma`` <= sigma_max)."""
  r = max(1, math.ceil(3 * sigma_max))
  t = jnp.arange(-r, r + 1, dtype=jnp.float32)
  k = jnp.exp(-0.5 * jnp.square(t / jnp.asarray(sigma, jnp.float32)))
  k = (k / jnp.sum(k)).astype(x.dtype)
  h, w = x.shape[:2]
  y = jnp.pad(x, ((r, r), (r, r), (0, 0)), mode='reflect')
  y = sum(k[i] * y[i : i + h] for i in range(2 * r + 1))
  return sum(k[i] * y[:, i : i + w] for i in range(2 * r + 1))


def augment_one(x: jax.Array, key: jax.Array, spec: ViewSpec) -> jax.Array:
  """MoCo v3 / BYOL strong augmentation of one float image [H, W, 3] in [0, 1]."""
  keys = jax.random.split(key, 10)
  # Drawn and compared in float32 whatever x's dtype: a bfloat16 image gets the float32 image's
  # augmentation (the same coin flips, orders and factors, only then rounded to x's dtype).
  u = lambda i, lo=0.0, hi=1.0: jax.random.uniform(keys[i], (), jnp.float32, lo, hi)  # noqa: E731

  if spec.jitter_prob > 0:
    b, c, s, h = spec.jitter
    fb, fc, fs = u(1, max(0.0, 1 - b), 1 + b), u(2, max(0.0, 1 - c), 1 + c), u(3, 1 - s, 1 + s)
    fh = u(4, -h, h)
    fb, fc, fs, fh = (f.astype(x.dtype) for f in (fb, fc, fs, fh))
    order = jnp.argsort(jax.random.uniform(keys[5], (4,)))
    jittered = x
    for i in range(4):
      jittered = jitter_position(jittered, order[i], (fb, fc, fs, fh))
    x = jnp.where(u(0) < spec.jitter_prob, jittered, x)
  if spec.grayscale_prob > 0:
    x = jnp.where(u(6) < spec.grayscale_prob, jnp.broadcast_to(grayscale(x), x.shape), x)
  if spec.blur_prob > 0:
    lo, hi = spec.blur_sigma
    x = jnp.where(u(7) < spec.blur_prob, gaussian_blur(x, u(8, lo, hi), hi), x)
  if spec.solarize_prob > 0:
    x = jnp.where(u(9) < spec.solarize_prob, jnp.where(x < 0.5, x, 1.0 - x), x)
  return x


def view_keys(seeds: jax.Array, name: str) -> jax.Array:
  """Per-example keys [B] of view ``name`` from the host's uint32 seeds [B, 2]."""
  view_id = zlib.crc32(name.encode()) & 0x7FFFFFFF
  fold = jax.random.fold_in

  def key(words):
    return fold(fold(fold(jax.random.key(view_id), words[0]), words[1]), 0)

  return jax.vmap(key)(seeds.astype(jnp.uint32))


def augment_views(
  images: jax.Array, keys: jax.Array, spec: ViewSpec, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
  """uint8 [B, H, W, 3] -> uint8, each image with its own key, computed in ``dtype``."""
  fn = lambda x, k: augment_one(x.astype(dtype) / 255.0, k, spec)  # noqa: E731
  out = jax.vmap(fn)(images, keys)
  return jnp.round(jnp.clip(out.astype(jnp.float32), 0.0, 1.0) * 255.0).astype(jnp.uint8)


def on_device(where: str, platform: str) -> bool:
  """``data.photometric`` -> whether the train step applies it: 'device', 'host', or 'auto' (the
  device on GPU / TPU; on CPU backends the host's tf.data ops, one image per thread, are the
  cheaper of the two: ~0.4 ms per 32 px image here for the vmapped version, which evaluates all
  four jitter operations at each of the four positions of the random order). ``platform``: that
  of the devices the step runs on (a plan's TPU, not this process's default backend)."""
  if where not in ('auto', 'device', 'host'):
    raise ValueError(f"data.photometric must be 'auto', 'device' or 'host', not {where!r}")
  if where == 'auto':
    return platform != 'cpu'
  return where == 'device'


def compute_dtype(platform: str) -> jnp.dtype:
  """The dtype the step's augmentation computes in on ``platform``: bfloat16 on an accelerator,
  where the jitter's passes over the [B, 224, 224, 3] views are HBM traffic (moco_to_mae on a
  v5e-8, by the plan's cost model: 179 -> 165 GB per chip per step); float32 on a CPU, which has
  no fast bf16. bfloat16 against float32 on 100 photographs at 64 px, every augmentation on: the
  same draws, pixels a mean 0.3 of a uint8 level apart, 99% within 2, the worst 7
  (tests/test_photometric.py holds them to 0.5, 2 and 12)."""
  return jnp.float32 if platform == 'cpu' else jnp.bfloat16


def make_batch_fn(
  specs: Mapping[str, ViewSpec], dtype: jnp.dtype = jnp.float32
) -> Callable[[dict], dict] | None:
  """batch -> batch with every strong view augmented on device (computed in ``dtype``: see
  :func:`compute_dtype`), or None if no view is strong.

  For use inside jit; the batch must carry ``AUG_SEED`` (pipeline.train_iterator with
  ``device_photometric=True``).
  """
  strong = {name: spec for name, spec in specs.items() if spec.strong}
  if not strong:
    return None

  def fn(batch: dict) -> dict:
    out = dict(batch)
    for name, spec in sorted(strong.items()):
      if name in batch:
        with jax.named_scope(f'photometric_{name}'):  # names the ops in profiles and plans
          out[name] = augment_views(batch[name], view_keys(batch[AUG_SEED], name), spec, dtype)
    return out

  return fn
