"""Analytic FLOP counts (2 x multiply-accumulates), for MFU. Matches REFERENCE section 5:
ViT-B/16 forward on 197 tokens = 35.1 GFLOP."""

from __future__ import annotations

# Peak dense bf16 FLOP/s of accelerators, for the MFU estimate (vendor figures).
PEAK_FLOPS = {
  'H100': 989e12,
  'H200': 989e12,
  'TPU v4': 275e12,
  'TPU v5 lite': 197e12,
  'TPU v5e': 197e12,
  'TPU v6e': 918e12,
  'TPU v6 lite': 918e12,
}


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


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s for a jax device_kind string, or None when unknown (CPU)."""
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in device_kind.lower():
      return flops
  return None
