"""ViT variant names ('B/16', 'S12/16', 'mu/4', ...) and their shapes, without importing JAX (the
command line validates them before JAX starts)."""

from __future__ import annotations

import dataclasses
import re

# width, depth, heads. MLP ratio is 4 for every variant.
VARIANTS: dict[str, tuple[int, int, int]] = {
  # Tiny variants for the embedded 32 px dataset (smaller -> larger, as S -> B -> L).
  'pico': (32, 2, 2),
  'mu': (64, 2, 2),
  'milli': (128, 4, 4),
  'Ti': (192, 12, 3),
  'S': (384, 12, 6),  # DeiT / timm ViT-S. MoCo v3's vit_small has 12 heads: use 'S12/16'.
  'S12': (384, 12, 12),
  'B': (768, 12, 12),
  'L': (1024, 24, 16),
  'H': (1280, 32, 16),
}


# How encoded tokens become one feature vector (k-NN, probes): see vit.pool_tokens.
POOLS = ('cls', 'mean', 'cls+mean')


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  """Architecture hyper-parameters of a ViT, decoded from a variant string."""

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int

  def kwargs(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def decode_variant(variant: str) -> ViTSpec:
  """Decodes 'B/16', 'S12/16', 'H/14', 'mu/4', ... into a :class:`ViTSpec`.

  The part before '/' names the size (one of pico, mu, milli, Ti, S, S12, B, L, H), the part after
  is the patch size in pixels.
  """
  m = re.fullmatch(r'([A-Za-z]+\d*)/(\d+)', variant)
  if not m or m.group(1) not in VARIANTS or int(m.group(2)) <= 0:
    raise ValueError(
      f'unknown ViT variant {variant!r}: expected SIZE/PATCH with SIZE one of '
      f'{", ".join(VARIANTS)} and PATCH a positive integer, e.g. "B/16"'
    )
  width, depth, heads = VARIANTS[m.group(1)]
  return ViTSpec(width, depth, heads, 4 * width, int(m.group(2)))


def name_variant(width: int, depth: int, num_heads: int, patch_size: int) -> str | None:
  """Inverse of :func:`decode_variant`; None for non-standard shapes."""
  for name, spec in VARIANTS.items():
    if spec == (width, depth, num_heads):
      return f'{name}/{patch_size}'
  return None
