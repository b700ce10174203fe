"""MAE pre-training: encoder on the visible 25%, decoder with mask tokens, norm-pix loss on the
masked patches. The reconstruction pieces are shared with DMAE and RC-MAE."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from moma_jax import flops, masking
from moma_jax import images as viz
from moma_jax.models.heads import MaeDecoder
from moma_jax.models.pretrained import IMAGENET, Normalization
from moma_jax.models.vit import ViT, patchify, pool_tokens
from moma_jax.objectives import Objective

Array = jax.Array


def pixel_targets(images: Array, patch_size: int, norm_pix: bool = True) -> Array:
  """[B, H, W, C] normalised images -> [B, N, p*p*C] targets; norm_pix standardises each patch
  with its own mean and (unbiased, as torch.var) variance, eps 1e-6, as MAE."""
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def masked_mean(per_patch: Array, keep_idx: Array) -> Array:
  """Mean of per_patch [B, N] over the *masked* patches (those not in keep_idx)."""
  masked = (~masking.visible_mask(keep_idx, per_patch.shape[1])).astype(per_patch.dtype)
  return (per_patch * masked).sum() / masked.sum()


def mae_decoder_for(encoder: ViT, width: int = 512, depth: int = 8, heads: int = 16) -> MaeDecoder:
  return MaeDecoder(
    num_patches=encoder.num_patches,
    patch_pixels=encoder.patch_size**2 * encoder.channels,
    width=width,
    depth=depth,
    num_heads=heads,
    dtype=encoder.dtype,
  )


@dataclasses.dataclass(frozen=True)
class Mae(Objective):
  encoder: ViT
  decoder: MaeDecoder
  mask_ratio: float = 0.75
  norm_pix: bool = True
  input_norm: Normalization = IMAGENET

  frozen_pattern = r'^(encoder/pos_embed|decoder/decoder_pos_embed)$'  # fixed sin-cos tables
  torch_format = 'mae'

  def required_views(self) -> set[str]:
    return {'image'}

  def init(self, rng: Array, start: Any | None = None) -> tuple[dict[str, Any], dict]:
    """start: optional {'encoder': params, 'decoder': params} (a converted MAE _full checkpoint)."""
    k_enc, k_dec = jax.random.split(rng)
    e = self.encoder
    x = jnp.zeros((1, e.image_size, e.image_size, e.channels))
    enc = e.init(k_enc, x)['params']
    tokens = jnp.zeros((1, 2, e.width))
    dec = self.decoder.init(k_dec, tokens, jnp.zeros((1, 1), jnp.int32))['params']
    if start is not None:
      enc, dec = start.get('encoder', enc), start.get('decoder', dec)
    return {'encoder': enc, 'decoder': dec}, {}

  def reconstruct(self, params: Any, images: Array, keep_idx: Array, rng: Array | None = None):
    """(predictions [B, N, p*p*C], encoder tokens [B, 1 + n, D], encoder intermediates)."""
    rngs = {'dropout': rng} if rng is not None else {}
    tokens, aux = self.encoder.apply(
      {'params': params['encoder']}, images, keep_idx, train=rng is not None, rngs=rngs
    )
    pred = self.decoder.apply({'params': params['decoder']}, tokens, keep_idx)
    return pred.astype(jnp.float32), tokens, aux

  def pixel_loss(self, pred: Array, images: Array, keep_idx: Array) -> Array:
    target = pixel_targets(images, self.encoder.patch_size, self.norm_pix)
    return masked_mean(jnp.square(pred - target).mean(-1), keep_idx)

  def keep_idx(self, rng: Array, batch: int) -> Array:
    return masking.random_keep_idx(rng, batch, self.encoder.num_patches, self.mask_ratio)

  def masked_reconstruction(self, params, batch, rng):
    """The MAE forward shared by MAE, DMAE and RC-MAE: (images, keep_idx, predictions,
    encoder intermediates, pixel loss) for one batch; ``rng`` drives masking and drop path."""
    k_mask, k_drop = jax.random.split(rng)
    images = self.input_norm(batch['image'])
    keep = self.keep_idx(k_mask, images.shape[0])
    pred, _, aux = self.reconstruct(params, images, keep, k_drop)
    return images, keep, pred, aux, self.pixel_loss(pred, images, keep)

  def loss(self, params, extra, frozen, batch, rng):
    *_, loss = self.masked_reconstruction(params, batch, rng)
    return loss, ({'loss': loss}, extra)

  def visualize(self, params, extra, frozen, batch: dict[str, Array], rng: Array) -> dict:
    """TensorBoard panels (``moma_jax.images``): input, what the encoder sees (masked as ``loss``
    masks with the same ``rng``) and the decoder's reconstruction in pixels."""
    k_mask, _ = jax.random.split(rng)
    x = self.input_norm(batch['image'])
    keep = self.keep_idx(k_mask, x.shape[0])
    pred, _, _ = self.reconstruct(params, x, keep)
    p, full = self.encoder.patch_size, viz.to_unit(batch['image'])
    norm = self.input_norm
    return {
      'input': full,
      'encoder sees': viz.masked(full, keep, p),
      'reconstruction': viz.reconstruction(pred, x, keep, p, self.norm_pix, norm.mean, norm.std),
    }

  def features(self, params, extra, frozen, images: Array, pool: str = 'cls') -> Array:
    tokens, _ = self.encoder.apply({'params': params['encoder']}, self.input_norm(images))
    return pool_tokens(tokens, pool).astype(jnp.float32)

  def export(self, params, extra):
    return {
      'encoder': (self.encoder, {'params': params['encoder']}, None),
      'decoder': (self.decoder, {'params': params['decoder']}, self.encoder.width),
    }

  def flops_per_example(self) -> float:
    e, d = self.encoder, self.decoder
    n = masking.num_visible(e.num_patches, self.mask_ratio)
    enc = flops.vit_flops(e, n)
    dec = flops.vit_forward_flops(d.width, d.depth, 4 * d.width, 1 + e.num_patches, 0, 0)
    dec += 2 * (1 + n) * e.width * d.width + 2 * e.num_patches * d.width * d.patch_pixels
    return 3 * (enc + dec)
