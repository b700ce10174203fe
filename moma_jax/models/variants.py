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


# name -> (block, stage sizes, width, small stem). The tiny ones (3x3 stem, no max-pool: a 32 px
# image keeps a 4x4 final map) are for the embedded 32 px dataset and the tests.
RESNETS: dict[str, tuple[str, tuple[int, ...], int, bool]] = {
  'resnet_pico': ('basic', (1, 1, 1, 1), 8, True),
  'resnet_mu': ('basic', (1, 1, 1, 1), 16, True),
  'resnet_milli': ('bottleneck', (1, 1, 1, 1), 16, True),
  'resnet18': ('basic', (2, 2, 2, 2), 64, False),
  'resnet34': ('basic', (3, 4, 6, 3), 64, False),
  'resnet50': ('bottleneck', (3, 4, 6, 3), 64, False),
  'resnet101': ('bottleneck', (3, 4, 23, 3), 64, False),
  'resnet152': ('bottleneck', (3, 8, 36, 3), 64, False),
}
