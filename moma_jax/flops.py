"""Analytic FLOP counts (2 x multiply-accumulates), for MFU and the plan (chip peaks: hardware.py).
Matches REFERENCE section 5: ViT-B/16 forward on 197 tokens = 35.1 GFLOP."""

from __future__ import annotations


def vit_forward_flops(
  width: int, depth: int, mlp_dim: int, tokens: int, patch_pixels: int, embedded: int
) -> float:
  """Forward FLOPs of a ViT encoder on ``tokens`` tokens (CLS included), ``embedded`` of which are
  patches through the patch embedding of ``patch_pixels`` inputs each."""
  per_token_block = (
    4 * width * width + 2 * width * mlp_dim + 2 * tokens * width
  )  # qkv+proj, mlp, attn
  macs = depth * tokens * per_token_block + embedded * patch_pixels * width
  return 2.0 * macs


def vit_flops(model, patches: int | None = None) -> float:
  """Forward FLOPs of a ViT module (moma_jax.models.vit.ViT: width, depth, mlp_dim, patch_size,
  channels, num_patches) on ``patches`` patch tokens (default: every patch) plus CLS."""
  n = model.num_patches if patches is None else patches
  pp = model.patch_size**2 * model.channels
  return vit_forward_flops(model.width, model.depth, model.mlp_dim, 1 + n, pp, n)
