"""Per-example image operations on the host, in TensorFlow (tf.data graph mode).

Every random choice is a *stateless* op driven by an explicit seed ([2] int tensor) derived from
(run seed, example position): the output is a pure function of the seed, so the pipeline is
deterministic under any parallelism and can be resumed at any step.

Images travel as uint8 until the device; float ops work in [0, 1] and cast back with rounding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from moma_jax.data.tf_quiet import tf

# MoCo v3 / BYOL colour jitter strengths (brightness, contrast, saturation, hue).
MOCO_JITTER = (0.4, 0.4, 0.2, 0.1)
BLUR_SIGMA = (0.1, 2.0)  # MoCo v3 / BYOL / DINO, in pixels of a 224 px crop


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """How to make one view of an example.

  crop: 'random_resized' (train) or 'center' (eval: resize the shorter side to
    size * resize_ratio, then a centre crop).
  scale, ratio: random-resized-crop area fraction and aspect-ratio range.
  share_crop_with: name of another view whose crop window and flip this view reuses.
  jitter_prob ... solarize_prob: MoCo v3 / BYOL photometric augmentations (0 disables).
  """

  size: int = 224
  crop: str = 'random_resized'
  scale: tuple[float, float] = (0.2, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  resize_ratio: float = 256 / 224
  share_crop_with: str | None = None
  jitter_prob: float = 0.0
  jitter: tuple[float, float, float, float] = MOCO_JITTER
  grayscale_prob: float = 0.0
  blur_prob: float = 0.0
  blur_sigma: tuple[float, float] = BLUR_SIGMA  # pixels; the kernel spans 3 sigma-max each side
  solarize_prob: float = 0.0
  randaugment: tuple[int, float] | None = None  # (num_ops, magnitude), magnitude std 0.5
  autoaugment: bool = False  # timm's ImageNet policy v0 (the MOMA paper's fine-tuning)

  @classmethod
  def from_config(cls, cfg: Any) -> ViewSpec:
    d = dict(cfg)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f'unknown view option(s) {sorted(unknown)}; known: {cls.__doc__}')
    for k in ('scale', 'ratio', 'jitter', 'randaugment', 'blur_sigma'):
      if d.get(k) is not None:
        d[k] = tuple(d[k])
    spec = cls(**d)
    lo, hi = spec.blur_sigma
    if spec.blur_prob > 0 and not (0 < lo <= hi and 3 * hi < spec.size):
      raise ValueError(
        f'view blur_sigma={spec.blur_sigma}: need 0 < low <= high < size / 3 (pixels of the '
        f'{spec.size} px view)'
      )
    if spec.crop not in ('random_resized', 'center'):
      raise ValueError(f"view crop must be 'random_resized' or 'center', not {spec.crop!r}")
    return spec

  @property
  def strong(self) -> bool:
    return any((self.jitter_prob, self.grayscale_prob, self.blur_prob, self.solarize_prob))


def moco_strong_view(size: int, blur_prob: float, solarize_prob: float, **kw: Any) -> ViewSpec:
  """One of MoCo v3's two asymmetric views (BYOL recipe): blur 1.0 / 0.1, solarise 0.0 / 0.2."""
  return ViewSpec(
    size=size,
    scale=(0.08, 1.0),
    jitter_prob=0.8,
    grayscale_prob=0.2,
    blur_prob=blur_prob,
    solarize_prob=solarize_prob,
    **kw,
  )


def split_seed(seed: tf.Tensor, n: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def _uniform(seed: tf.Tensor, lo: float = 0.0, hi: float = 1.0) -> tf.Tensor:
  return tf.random.stateless_uniform([], seed, lo, hi)


# --- decoding and geometry -------------------------------------------------------------------------


def image_shape(image: tf.Tensor) -> tf.Tensor:
  """[H, W] of an encoded (string) or decoded (uint8 HWC) image, without decoding JPEGs."""
  if image.dtype == tf.string:
    return tf.cond(
      tf.io.is_jpeg(image),
      lambda: tf.image.extract_jpeg_shape(image)[:2],
      lambda: tf.shape(tf.image.decode_image(image, channels=3, expand_animations=False))[:2],
    )
  return tf.shape(image)[:2]


def random_crop_window(shape: tf.Tensor, seed: tf.Tensor, spec: ViewSpec) -> tf.Tensor:
  """Inception-style random resized crop window [y, x, h, w] within an image of ``shape`` [H, W]."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.concat([shape, [3]], 0),
    bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
    seed=seed,
    min_object_covered=0.0,
    aspect_ratio_range=spec.ratio,
    area_range=spec.scale,
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def decode_crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  """Decodes only the window [y, x, h, w] of a JPEG (fused); other formats decode, then crop.

  Grayscale and CMYK JPEGs come out as RGB (channels=3); PNG/GIF/BMP data is handled whatever the
  file name says.
  """
  if image.dtype == tf.string:
    return tf.cond(
      tf.io.is_jpeg(image),
      lambda: tf.image.decode_and_crop_jpeg(image, window, channels=3),
      lambda: tf.image.decode_image(image, channels=3, expand_animations=False)[
        window[0] : window[0] + window[2], window[1] : window[1] + window[3]
      ],
    )
  return image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]


def decode_full(image: tf.Tensor) -> tf.Tensor:
  if image.dtype == tf.string:
    return tf.image.decode_image(image, channels=3, expand_animations=False)
  return image


def resize(image: tf.Tensor, size: int | tuple[int, int]) -> tf.Tensor:
  """Bicubic resize to [size, size] (or (h, w)); returns float32 in [0, 255]."""
  hw = (size, size) if isinstance(size, int) else size
  out = tf.image.resize(tf.cast(image, tf.float32), hw, method='bicubic')
  return tf.clip_by_value(out, 0.0, 255.0)


def center_crop(image: tf.Tensor, spec: ViewSpec) -> tf.Tensor:
  """Evaluation crop: shorter side to size * resize_ratio (bicubic), then a centre crop."""
  image = decode_full(image)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  short = tf.cast(tf.math.round(spec.size * spec.resize_ratio), tf.float32)
  scale = short / tf.reduce_min(shape)
  hw = tf.cast(tf.math.round(shape * scale), tf.int32)
  hw = tf.maximum(hw, spec.size)
  image = resize(image, (hw[0], hw[1]))
  y, x = (hw[0] - spec.size) // 2, (hw[1] - spec.size) // 2
  return image[y : y + spec.size, x : x + spec.size]


# --- photometric (float in [0, 1]) -----------------------------------------------------------------


def _grayscale(x: tf.Tensor) -> tf.Tensor:
  return tf.image.rgb_to_grayscale(x)  # ITU-R 601 luma, as PIL's convert('L')


def color_jitter(x: tf.Tensor, seed: tf.Tensor, strengths: tuple[float, ...]) -> tf.Tensor:
  """torchvision ColorJitter: brightness, contrast, saturation, hue, in a random order."""
  b, c, s, h = strengths
  seeds = split_seed(seed, 5)
  fb = _uniform(seeds[0], max(0.0, 1 - b), 1 + b)
  fc = _uniform(seeds[1], max(0.0, 1 - c), 1 + c)
  fs = _uniform(seeds[2], max(0.0, 1 - s), 1 + s)
  fh = _uniform(seeds[3], -h, h)
  ops = [
    lambda y: tf.clip_by_value(y * fb, 0.0, 1.0),
    lambda y: tf.clip_by_value(
      (y - tf.reduce_mean(_grayscale(y))) * fc + tf.reduce_mean(_grayscale(y)), 0.0, 1.0
    ),
    lambda y: tf.clip_by_value((y - _grayscale(y)) * fs + _grayscale(y), 0.0, 1.0),
    lambda y: tf.image.adjust_hue(y, fh),
  ]
  order = tf.argsort(tf.random.stateless_uniform([4], seeds[4]))
  for i in range(4):
    x = tf.switch_case(order[i], [lambda op=op, x=x: op(x) for op in ops])
    x.set_shape([None, None, 3])
  return x


def gaussian_blur(x: tf.Tensor, sigma: tf.Tensor, sigma_max: float = BLUR_SIGMA[1]) -> tf.Tensor:
  """Separable Gaussian blur (reflect padding); the kernel has 2 ceil(3 sigma_max) + 1 taps (13
  for the default 2 px), whatever the drawn ``sigma`` <= sigma_max."""
  r = max(1, math.ceil(3 * sigma_max))
  t = tf.range(-r, r + 1, dtype=tf.float32)
  k = tf.exp(-0.5 * tf.square(t / sigma))
  k = k / tf.reduce_sum(k)
  y = tf.pad(x[None], [[0, 0], [r, r], [r, r], [0, 0]], mode='REFLECT')
  kh = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, 3, 1])
  kw = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, 3, 1])
  y = tf.nn.depthwise_conv2d(y, kh, [1, 1, 1, 1], 'VALID')
  y = tf.nn.depthwise_conv2d(y, kw, [1, 1, 1, 1], 'VALID')
  return y[0]


def _maybe(prob: float, seed: tf.Tensor, fn, x: tf.Tensor) -> tf.Tensor:
  if prob <= 0:
    return x
  if prob >= 1:
    return fn(x)
  return tf.cond(_uniform(seed) < prob, lambda: fn(x), lambda: x)


def photometric(x: tf.Tensor, seed: tf.Tensor, spec: ViewSpec) -> tf.Tensor:
  """MoCo v3 / BYOL strong augmentation on float [0, 255] -> float [0, 255]."""
  if not spec.strong:
    return x
  s = split_seed(seed, 6)
  x = x / 255.0
  x = _maybe(spec.jitter_prob, s[0], lambda y: color_jitter(y, s[1], spec.jitter), x)
  x = _maybe(spec.grayscale_prob, s[2], lambda y: tf.tile(_grayscale(y), [1, 1, 3]), x)
  lo, hi = spec.blur_sigma
  sigma = _uniform(s[4], lo, hi)
  x = _maybe(spec.blur_prob, s[3], lambda y: gaussian_blur(y, sigma, hi), x)
  x = _maybe(spec.solarize_prob, s[5], lambda y: tf.where(y < 0.5, y, 1.0 - y), x)
  return x * 255.0


def to_uint8(x: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def make_views(
  image: tf.Tensor, seed: tf.Tensor, specs: dict[str, ViewSpec], photometric_ops: bool = True
) -> dict[str, tf.Tensor]:
  """All views of one example: {name: uint8 [size, size, 3]}.

  Views that name ``share_crop_with`` reuse that view's crop window and flip (decoded once), and
  apply their own resize and photometric augmentation (unless ``photometric_ops`` is False: the
  train step then applies it on device, moma_jax/data/photometric.py).
  """
  from moma_jax.data import randaugment  # heavy op table; only built when used

  names = sorted(specs)
  seeds = dict(zip(names, split_seed(seed, len(names)), strict=True))
  geometry: dict[str, tuple[tf.Tensor, tf.Tensor]] = {}  # owner view -> (crop, flipped?)
  out = {}
  shape = None
  for name in sorted(names, key=lambda n: specs[n].share_crop_with is not None):
    spec = specs[name]
    s_geo, s_photo, s_ra = split_seed(seeds[name], 3)
    if spec.crop == 'center':
      x = center_crop(image, spec)
    else:
      owner = spec.share_crop_with or name
      if owner not in geometry:
        if owner != name:
          raise ValueError(f'view {name!r} shares the crop of {owner!r}, which is not a view')
        if shape is None:
          shape = image_shape(image)
        s_win, s_flip = split_seed(s_geo, 2)
        crop = decode_crop(image, random_crop_window(shape, s_win, spec))
        flip = spec.flip & (_uniform(s_flip) < 0.5)
        geometry[owner] = (crop, flip)
      crop, flip = geometry[owner]
      x = resize(crop, spec.size)
      x = tf.cond(flip, lambda x=x: tf.reverse(x, [1]), lambda x=x: x)
    if spec.randaugment:
      x = randaugment.rand_augment(x, s_ra, *spec.randaugment)
    if spec.autoaugment:
      x = randaugment.auto_augment(x, s_ra)
    if photometric_ops:
      x = photometric(x, s_photo, spec)
    x = to_uint8(x)
    x.set_shape([spec.size, spec.size, 3])
    out[name] = x
  return out
