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
