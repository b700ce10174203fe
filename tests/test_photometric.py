"""On-device photometric augmentation (moma_jax/data/photometric.py) against independent
references (tf.image, colorsys, scipy.ndimage), its probabilities, and its determinism (a function
of each example's seed only: any batch order, any sharding)."""

from __future__ import annotations

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import NamedSharding, PartitionSpec

from moma_jax.data import photometric, pipeline, sources
from moma_jax.data.augment import ViewSpec, moco_strong_view


def _image(seed=0, shape=(32, 32, 3)):
  return np.random.RandomState(seed).uniform(0, 1, shape).astype(np.float32)


def test_hsv_round_trip_and_hue_match_colorsys_and_tf():
  x = _image()
  hsv = np.asarray(photometric.rgb_to_hsv(jnp.asarray(x)))
  ref = np.array([colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3)]).reshape(x.shape)
  np.testing.assert_allclose(hsv, ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(photometric.hsv_to_rgb(jnp.asarray(hsv))), x, atol=1e-5)
  for delta in (-0.1, 0.03, 0.5):
    got = np.asarray(photometric.hue(jnp.asarray(x), delta))
    np.testing.assert_allclose(got, tf.image.adjust_hue(x, delta).numpy(), atol=1e-5)


def test_brightness_contrast_saturation_follow_torchvision_blends():
  x = _image(1)
  luma = x @ np.array([0.2989, 0.5870, 0.1140], np.float32)
  np.testing.assert_allclose(photometric.brightness(x, 1.3), np.clip(x * 1.3, 0, 1), atol=1e-6)
  m = luma.mean()
  np.testing.assert_allclose(
    photometric.contrast(x, 0.6), np.clip((x - m) * 0.6 + m, 0, 1), atol=1e-6
  )
  g = luma[..., None]
  np.testing.assert_allclose(
    photometric.saturation(x, 1.2), np.clip((x - g) * 1.2 + g, 0, 1), atol=1e-6
  )
  # the luma itself against tf.image (its adjust_saturation works in HSV: a different op)
  np.testing.assert_allclose(
    photometric.grayscale(x), tf.image.rgb_to_grayscale(x).numpy(), atol=1e-6
  )


@pytest.mark.parametrize('sigma', [0.3, 1.0, 2.0])
def test_blur_matches_scipy_with_reflect_padding(sigma):
  from scipy import ndimage

  x = _image(2)
  got = np.asarray(photometric.gaussian_blur(jnp.asarray(x), sigma, 2.0))
  r = 6  # 2 ceil(3 * 2.0) + 1 taps
  ref = x
  for axis in (0, 1):  # scipy's 'mirror' is NumPy's 'reflect' (the edge pixel not repeated)
    ref = ndimage.gaussian_filter1d(ref, sigma, axis=axis, mode='mirror', truncate=r / sigma)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_fused_jitter_positions_apply_the_four_operations_in_the_drawn_order():
  """jitter_position (one formula for the three blends, hue by select) against the four
  operations applied one after another in NumPy / TensorFlow, for every order's first position
  and for two whole random orders."""
  rng = np.random.RandomState(3)
  x = rng.uniform(0, 1, (9, 7, 3)).astype(np.float32)
  factors = (1.3, 0.6, 1.4, 0.08)

  def reference(y, op):
    if op == 0:
      return np.clip(y * factors[0], 0, 1)
    if op == 3:
      return np.clip(tf.image.adjust_hue(y, factors[3]).numpy(), 0, 1)
    gray = tf.image.rgb_to_grayscale(y).numpy()
    centre = gray.mean() if op == 1 else gray
    return np.clip((y - centre) * factors[op] + centre, 0, 1)

  for op in range(4):
    got = photometric.jitter_position(jnp.asarray(x), jnp.asarray(op), factors)
    np.testing.assert_allclose(got, reference(x, op), atol=2e-5)
  for order in ((2, 0, 3, 1), (3, 1, 0, 2)):
    got, ref = jnp.asarray(x), x
    for op in order:
      got = photometric.jitter_position(got, jnp.asarray(op), factors)
      ref = reference(ref, op)
    np.testing.assert_allclose(got, ref, atol=5e-5)


def _seeds(n, start=0):
  words = np.random.RandomState(start).randint(0, 2**32, size=(n, 2), dtype=np.uint64)
  return words.astype(np.uint32)


def test_probabilities_and_ranges():
  spec = moco_strong_view(16, blur_prob=0.0, solarize_prob=0.5)
  n = 2000
  x = np.full((n, 16, 16, 3), (200, 40, 90), np.uint8)  # one colour: grey iff R == G == B
  out = np.asarray(photometric.augment_views(x, photometric.view_keys(_seeds(n), 'v'), spec))
  assert out.dtype == np.uint8 and out.shape == x.shape
  gray = np.all(out[..., :1] == out, axis=-1).all(axis=(1, 2))
  # grayscale p 0.2 (jitter cannot make this colour grey: saturation >= 0.8 keeps chroma)
  assert 0.17 < gray.mean() < 0.23, gray.mean()
  changed = np.any(out != x, axis=(1, 2, 3))
  assert changed.mean() > 0.85  # jitter 0.8, grayscale 0.2, solarise 0.5: ~0.94 of the images
  none = ViewSpec(size=16)
  assert photometric.make_batch_fn({'v': none}) is None


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_an_image_whose_coins_come_up_tails_is_left_exactly_as_it_was(dtype):
  """An image whose jitter and grayscale coins both come up tails is returned bit for bit, in
  float32 and in bfloat16 (the uint8 -> [0, 1] -> uint8 round trip is exact in both), and one
  whose grayscale coin always comes up heads is grey."""
  never = ViewSpec(size=16, jitter_prob=1e-9, grayscale_prob=1e-9)
  x = np.random.RandomState(0).randint(0, 256, (64, 16, 16, 3)).astype(np.uint8)
  keys = photometric.view_keys(_seeds(64), 'v')
  out = jax.jit(photometric.augment_views, static_argnums=(2, 3))(x, keys, never, dtype)
  np.testing.assert_array_equal(out, x)
  always = ViewSpec(size=16, jitter_prob=1e-9, grayscale_prob=1.0)
  grey = np.asarray(
    jax.jit(photometric.augment_views, static_argnums=(2, 3))(x, keys, always, dtype)
  )
  assert np.all(grey == grey[..., :1]) and not np.array_equal(grey, x)


def test_bfloat16_on_an_accelerator_agrees_with_float32():
  """The step augments in bfloat16 on a TPU / GPU (compute_dtype): the same draws as float32 (the
  random factors, orders and coin flips are float32 in both), and pixels within a few uint8
  levels on photographs (skimage's), jitter, grayscale, blur and solarisation all on."""
  from skimage import data
  from skimage.transform import resize

  assert photometric.compute_dtype('tpu') == photometric.compute_dtype('gpu') == jnp.bfloat16
  assert photometric.compute_dtype('cpu') == jnp.float32
  photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
  x = np.stack([(resize(p, (48, 48)) * 255).astype(np.uint8) for p in photos] * 16)
  spec = moco_strong_view(48, blur_prob=0.5, solarize_prob=0.2)
  keys = photometric.view_keys(_seeds(len(x), 7), 'v')
  f32, bf16 = (
    np.asarray(jax.jit(photometric.augment_views, static_argnums=(2, 3))(x, keys, spec, dt))
    for dt in (jnp.float32, jnp.bfloat16)
  )
  gray = lambda y: np.all(y[..., :1] == y, axis=-1).all(axis=(1, 2))  # noqa: E731
  np.testing.assert_array_equal(gray(bf16), gray(f32))  # the same grayscale coin flips
  assert 0.05 < gray(f32).mean() < 0.5
  d = np.abs(f32.astype(int) - bf16.astype(int))
  assert 0 < d.mean() < 0.5 and np.percentile(d, 99) <= 2 and d.max() <= 12, (d.mean(), d.max())


def test_a_function_of_each_example_seed_only_any_order_any_sharding():
  spec = moco_strong_view(16, blur_prob=0.5, solarize_prob=0.2)
  n = 16
  rng = np.random.RandomState(0)
  batch = {
    'v': rng.randint(0, 256, (n, 16, 16, 3)).astype(np.uint8),
    'plain': rng.randint(0, 256, (n, 16, 16, 3)).astype(np.uint8),
    photometric.AUG_SEED: _seeds(n, 3),
  }
  fn = jax.jit(photometric.make_batch_fn({'v': spec, 'plain': ViewSpec(size=16)}))
  ref = jax.device_get(fn(batch))
  np.testing.assert_array_equal(ref['plain'], batch['plain'])  # not strong: untouched
  assert not np.array_equal(ref['v'], batch['v'])
  perm = rng.permutation(n)
  shuffled = jax.device_get(fn({k: v[perm] for k, v in batch.items()}))
  np.testing.assert_array_equal(shuffled['v'], ref['v'][perm])
  mesh = jax.make_mesh((len(jax.devices()),), ('data',))
  sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec('data')))
  np.testing.assert_array_equal(jax.device_get(fn(sharded))['v'], ref['v'])
  # two views of one example get different draws
  two = jax.device_get(
    jax.jit(photometric.make_batch_fn({'v': spec, 'w': spec}))({**batch, 'w': batch['v']})
  )
  assert not np.array_equal(two['v'], two['w'])


def test_pipeline_hands_geometry_and_seeds_to_the_device():
  src = sources.open_split('digits', 'train')
  views = {'a': moco_strong_view(32, blur_prob=1.0, solarize_prob=0.0)}
  plain = {'a': ViewSpec(size=32, scale=views['a'].scale)}  # the same geometry, nothing else
  on_device = next(pipeline.train_iterator(src, views, batch_size=8, seed=4,
                                           device_photometric=True))  # fmt: skip
  geometry_only = next(pipeline.train_iterator(src, plain, batch_size=8, seed=4))
  # the host did the crop and flip exactly as without photometric ops, and nothing else
  np.testing.assert_array_equal(on_device['a'], geometry_only['a'])
  seeds = on_device[photometric.AUG_SEED]
  assert seeds.dtype == np.uint32 and seeds.shape == (8, 2) and len({tuple(s) for s in seeds}) == 8
  again = next(pipeline.train_iterator(src, views, batch_size=8, seed=4, device_photometric=True))
  np.testing.assert_array_equal(again[photometric.AUG_SEED], seeds)
