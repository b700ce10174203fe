"""RandAugment and AutoAugment in TensorFlow, with timm's operation semantics.

MAE fine-tunes with timm's ``rand-m9-mstd0.5-inc1``: 2 operations drawn with replacement from the
15 below, each applied with probability 0.5 at a magnitude drawn from N(9, 0.5) clipped to
[0, 10], using the "increasing" variants (stronger with magnitude). The paper's own recipe uses
AutoAugment (timm's ImageNet policy 'v0'). Written here because no maintained TF library carries
them any more (tensorflow-addons is gone; tf-models-official pins its own TensorFlow); every random
choice is stateless, like the rest of the pipeline.

Images are float32 [H, W, 3] in [0, 255].
"""

from __future__ import annotations

import math

from moma_jax.data.tf_quiet import tf

_MAX = 10.0
_FILL = (124.0, 116.0, 104.0)  # timm fills exposed pixels with the ImageNet mean


def _blend(a: tf.Tensor, b: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL ImageEnhance: b + factor * (a - b), clipped."""
  return tf.clip_by_value(b + factor * (a - b), 0.0, 255.0)


def _gray(x: tf.Tensor) -> tf.Tensor:
  return tf.image.rgb_to_grayscale(x)


def _transform(x: tf.Tensor, matrix: list) -> tf.Tensor:
  """Affine warp; ``matrix`` maps output (x, y) to input: [a0, a1, a2, b0, b1, b2, 0, 0]."""
  t = tf.cast(tf.stack(matrix), tf.float32)[None]
  out = []
  for c in range(3):  # ImageProjectiveTransform has one fill value: apply per channel
    out.append(
      tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None, :, :, c : c + 1],
        transforms=t,
        output_shape=tf.shape(x)[:2],
        fill_value=_FILL[c],
        interpolation='BILINEAR',
        fill_mode='CONSTANT',
      )[0]
    )
  return tf.concat(out, axis=-1)


def _signed(v: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  return tf.where(tf.random.stateless_uniform([], seed) < 0.5, -v, v)


def auto_contrast(x, m, s):
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-3), 1.0)
  return tf.where(hi > lo, (x - lo) * scale, x)


def equalize(x, m, s):
  """PIL ImageOps.equalize, per channel."""

  def channel(c):
    c = tf.cast(c, tf.int32)
    hist = tf.math.bincount(c, minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    lut = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.cast(tf.where(step == 0, c, tf.gather(lut, c)), tf.float32)

  xi = tf.round(x)
  return tf.stack([channel(xi[..., i]) for i in range(3)], axis=-1)


def invert(x, m, s):
  return 255.0 - x


def rotate(x, m, s):
  deg = _signed(m / _MAX * 30.0, s) * math.pi / 180.0
  h, w = tf.cast(tf.shape(x)[0], tf.float32), tf.cast(tf.shape(x)[1], tf.float32)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  cos, sin = tf.cos(deg), tf.sin(deg)
  return _transform(
    x, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0]
  )


def posterize(x, m, s):
  bits = 4 - tf.cast(m / _MAX * 4, tf.int32)
  shift = tf.cast(8 - bits, tf.int32)
  xi = tf.cast(tf.round(x), tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(xi, shift), shift), tf.float32)


def solarize(x, m, s):
  thresh = 256.0 - tf.floor(m / _MAX * 256.0)
  return tf.where(x < thresh, x, 255.0 - x)


def solarize_add(x, m, s):
  add = tf.floor(m / _MAX * 110.0)
  return tf.where(x < 128.0, tf.minimum(x + add, 255.0), x)


def _factor(m, s):
  return 1.0 + _signed(m / _MAX * 0.9, s)


def color(x, m, s):
  return _blend(x, _gray(x), _factor(m, s))


def contrast(x, m, s):
  return _blend(x, tf.reduce_mean(_gray(x)), _factor(m, s))


def brightness(x, m, s):
  return _blend(x, tf.zeros_like(x), _factor(m, s))


def sharpness(x, m, s):
  k = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  k = tf.tile(k[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x[None], k, [1, 1, 1, 1], 'VALID')[0]
  # PIL keeps the border pixels unchanged.
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  mask = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]])
  smooth = mask * smooth + (1 - mask) * x
  return _blend(x, smooth, _factor(m, s))


def shear_x(x, m, s):
  v = _signed(m / _MAX * 0.3, s)
  return _transform(x, [1.0, v, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(x, m, s):
  v = _signed(m / _MAX * 0.3, s)
  return _transform(x, [1.0, 0.0, 0.0, v, 1.0, 0.0, 0.0, 0.0])


def translate_x(x, m, s):
  v = _signed(m / _MAX * 0.45, s) * tf.cast(tf.shape(x)[1], tf.float32)
  return _transform(x, [1.0, 0.0, v, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(x, m, s):
  v = _signed(m / _MAX * 0.45, s) * tf.cast(tf.shape(x)[0], tf.float32)
  return _transform(x, [1.0, 0.0, 0.0, 0.0, 1.0, v, 0.0, 0.0])


OPS = {
  'AutoContrast': auto_contrast,
  'Equalize': equalize,
  'Invert': invert,
  'Rotate': rotate,
  'Posterize': posterize,
  'Solarize': solarize,
  'SolarizeAdd': solarize_add,
  'Color': color,
  'Contrast': contrast,
  'Brightness': brightness,
  'Sharpness': sharpness,
  'ShearX': shear_x,
  'ShearY': shear_y,
  'TranslateX': translate_x,
  'TranslateY': translate_y,
}
_NAMES = list(OPS)


def _apply(x: tf.Tensor, op: tf.Tensor, magnitude: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  branches = [lambda f=f: f(x, magnitude, seed) for f in OPS.values()]
  out = tf.switch_case(op, branches)
  out.set_shape(x.shape)
  return out


def rand_augment(
  x: tf.Tensor, seed: tf.Tensor, num_ops: int = 2, magnitude: float = 9.0, std: float = 0.5
) -> tf.Tensor:
  """timm RandAugment (increasing ops): ``num_ops`` ops with replacement, each with p = 0.5."""
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4 * num_ops))
  for i in range(num_ops):
    s_op, s_p, s_m, s_sign = seeds[4 * i : 4 * i + 4]
    op = tf.random.stateless_uniform([], s_op, 0, len(OPS), dtype=tf.int32)
    m = tf.clip_by_value(magnitude + std * tf.random.stateless_normal([], s_m), 0.0, _MAX)
    y = _apply(x, op, m, s_sign)
    x = tf.where(tf.random.stateless_uniform([], s_p) < 0.5, y, x)
  return x


# timm's AutoAugment ImageNet policy 'v0': (op, probability, magnitude) pairs.
AUTO_AUGMENT_V0 = [
  [('Equalize', 0.8, 1), ('ShearY', 0.8, 4)],
  [('Color', 0.4, 9), ('Equalize', 0.6, 3)],
  [('Color', 0.4, 1), ('Rotate', 0.6, 8)],
  [('Solarize', 0.8, 3), ('Equalize', 0.4, 7)],
  [('Solarize', 0.4, 2), ('Solarize', 0.6, 2)],
  [('Color', 0.2, 0), ('Equalize', 0.8, 8)],
  [('Equalize', 0.4, 8), ('SolarizeAdd', 0.8, 3)],
  [('ShearX', 0.2, 9), ('Rotate', 0.6, 8)],
  [('Color', 0.6, 1), ('Equalize', 1.0, 2)],
  [('Invert', 0.4, 9), ('Rotate', 0.6, 0)],
  [('Equalize', 1.0, 9), ('ShearY', 0.6, 3)],
  [('Color', 0.4, 7), ('Equalize', 0.6, 0)],
  [('Posterize', 0.4, 6), ('AutoContrast', 0.4, 7)],
  [('Solarize', 0.6, 8), ('Color', 0.6, 9)],
  [('Solarize', 0.2, 4), ('Rotate', 0.8, 9)],
  [('Rotate', 1.0, 7), ('TranslateY', 0.8, 9)],
  [('ShearX', 0.0, 0), ('Solarize', 0.8, 4)],
  [('ShearY', 0.8, 0), ('Color', 0.6, 4)],
  [('Color', 1.0, 0), ('Rotate', 0.6, 2)],
  [('Equalize', 0.8, 4), ('Equalize', 0.0, 8)],
  [('Equalize', 1.0, 4), ('AutoContrast', 0.6, 2)],
  [('ShearY', 0.4, 7), ('SolarizeAdd', 0.6, 7)],
  [('Posterize', 0.8, 2), ('Solarize', 0.6, 10)],
  [('Solarize', 0.6, 8), ('Equalize', 0.6, 1)],
  [('Color', 0.8, 6), ('Rotate', 0.4, 5)],
]


def auto_augment(x: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """AutoAugment: one sub-policy drawn uniformly, its two ops applied with their probabilities."""
  s_pick, s1, s2, s3, s4 = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
  ops = tf.constant([[_NAMES.index(o) for o, _, _ in p] for p in AUTO_AUGMENT_V0])
  probs = tf.constant([[pr for _, pr, _ in p] for p in AUTO_AUGMENT_V0], tf.float32)
  mags = tf.constant([[float(m) for _, _, m in p] for p in AUTO_AUGMENT_V0], tf.float32)
  k = tf.random.stateless_uniform([], s_pick, 0, len(AUTO_AUGMENT_V0), dtype=tf.int32)
  for j, (s_p, s_sign) in enumerate(((s1, s2), (s3, s4))):
    y = _apply(x, ops[k, j], mags[k, j], s_sign)
    x = tf.where(tf.random.stateless_uniform([], s_p) < probs[k, j], y, x)
  return x
