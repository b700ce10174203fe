"""Image summaries (moma_jax.images) against NumPy, and the objectives' panels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moma_jax import images, masking
from moma_jax.models.pretrained import Normalization
from moma_jax.objectives.mae import pixel_targets


def _np_blocks(x: np.ndarray, p: int) -> np.ndarray:
  """[B, H, W, C] -> [B, H/p, W/p, p, p, C], row-major patch order as the ViT."""
  b, h, w, c = x.shape
  return x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)


def test_masked_greys_exactly_the_hidden_patches():
  rng = np.random.RandomState(0)
  x = rng.rand(2, 16, 24, 3).astype(np.float32)
  keep = masking.random_keep_idx(jax.random.key(1), 2, 6, 0.5)
  got = _np_blocks(np.asarray(images.masked(jnp.asarray(x), keep, 8)), 8).reshape(2, 6, -1)
  want = _np_blocks(x, 8).reshape(2, 6, -1)
  for b in range(2):
    visible = set(np.asarray(keep[b]).tolist())
    for n in range(6):
      np.testing.assert_array_equal(got[b, n], want[b, n] if n in visible else images.HIDDEN)


def test_a_perfect_norm_pix_prediction_reconstructs_the_input():
  """Predicting every patch's standardised pixels exactly gives the input image back: norm-pix,
  patch order and the input normalisation are all undone correctly."""
  rng = np.random.RandomState(1)
  uint8 = rng.randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  norm = Normalization((0.3, 0.4, 0.5), (0.2, 0.25, 0.3))
  x = norm(jnp.asarray(uint8))
  keep = masking.random_keep_idx(jax.random.key(0), 2, 16, 0.75)
  for norm_pix in (True, False):
    pred = pixel_targets(x, 8, norm_pix)
    out = images.reconstruction(pred, x, keep, 8, norm_pix, norm.mean, norm.std)
    np.testing.assert_allclose(np.asarray(out), uint8 / 255.0, atol=2e-5)
  # A wrong prediction shows in the hidden patches only.
  out = np.asarray(
    images.reconstruction(jnp.zeros_like(pred), x, keep, 8, False, norm.mean, norm.std)
  )
  diff = np.abs(_np_blocks(out - uint8 / 255.0, 8)).reshape(2, 16, -1).max(-1)
  for b in range(2):
    visible = set(np.asarray(keep[b]).tolist())
    assert all((diff[b, n] < 2e-5) == (n in visible) for n in range(16))


def test_side_by_side():
  a, b = jnp.zeros((3, 8, 8, 3)), jnp.full((3, 8, 8, 3), 0.25)
  out = np.asarray(images.side_by_side({'a': a, 'b': b}, gap=2))
  assert out.shape == (3, 8, 18, 3)
  assert (
    (out[:, :, :8] == 0).all() and (out[:, :, 8:10] == 1).all() and (out[:, :, 10:] == 0.25).all()
  )


def test_mae_panels_show_the_loss_mask_and_keep_visible_patches():
  from moma_jax.models import vit
  from moma_jax.objectives.mae import Mae, mae_decoder_for

  enc = vit.ViT(**{**vit.decode_variant('mu/4').kwargs(), 'image_size': 32})
  mae = Mae(enc, mae_decoder_for(enc, width=32, depth=1, heads=2))
  params, extra = mae.init(jax.random.key(0))
  uint8 = jnp.asarray(np.random.RandomState(2).randint(0, 256, (3, 32, 32, 3)), jnp.uint8)
  rng = jax.random.key(5)
  panels = mae.visualize(params, extra, {}, {'image': uint8}, rng)
  assert list(panels) == ['input', 'encoder sees', 'reconstruction']
  _, keep, *_ = mae.masked_reconstruction(params, {'image': uint8}, rng)  # the loss's mask
  full = uint8 / 255.0
  np.testing.assert_array_equal(panels['encoder sees'], images.masked(full, keep, 4))
  visible = images.masked(full, keep, 4) != images.HIDDEN
  np.testing.assert_allclose(
    np.asarray(panels['reconstruction'])[visible], np.asarray(full)[visible], atol=2e-5
  )
