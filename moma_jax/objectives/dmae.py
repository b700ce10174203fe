"""DMAE: MAE with masked feature distillation. A frozen teacher sees the *same visible tokens* as
the student; an intermediate teacher block is aligned with an intermediate student block through
a linear projector, with L1 between L2-normalised features, plus MAE's pixel loss.

Blocks are counted from 1 as in the paper (teacher block 18 of 24, student block 9 of 12); the
visible patch tokens are aligned (CLS left out)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moma_jax.models.pretrained import IMAGENET, Normalization
from moma_jax.models.vit import ViT
from moma_jax.objectives.mae import Mae

Array = jax.Array


def l2_normalize(x: Array) -> Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


@dataclasses.dataclass(frozen=True)
class Dmae(Mae):
  teacher: ViT | None = None
  teacher_block: int = 18
  student_block: int = 9
  distill_weight: float = 1.0
  teacher_input_norm: Normalization = IMAGENET  # the teacher's own input statistics

  def __post_init__(self):
    if self.teacher is None:
      raise ValueError('DMAE needs a teacher')
    if not 1 <= self.teacher_block <= self.teacher.depth:
      raise ValueError(
        f'dmae.teacher_block={self.teacher_block}: the teacher has {self.teacher.depth} blocks'
      )
    if not 1 <= self.student_block <= self.encoder.depth:
      raise ValueError(
        f'dmae.student_block={self.student_block}: the student has {self.encoder.depth} blocks'
      )
    if self.teacher.grid != self.encoder.grid:
      raise ValueError(
        "DMAE feeds the teacher the student's visible patches: the patch grids must match"
      )

  def init(self, rng, start=None):
    params, extra = super().init(rng, start)
    k = jax.random.fold_in(rng, 7)
    params['projector'] = nn.Dense(self.teacher.width).init(k, jnp.zeros((1, self.encoder.width)))[
      'params'
    ]
    return params, extra

  def loss(self, params, extra, frozen, batch, rng):
    _, keep, _, aux, pixel = self.masked_reconstruction(params, batch, rng)
    t_images = self.teacher_input_norm(batch['image'])
    _, t_aux = self.teacher.apply(frozen['teacher'], t_images, keep)  # same visible tokens
    target = jax.lax.stop_gradient(t_aux[f'block_{self.teacher_block - 1}'][:, 1:])
    student = aux[f'block_{self.student_block - 1}'][:, 1:]
    proj = nn.Dense(self.teacher.width).apply({'params': params['projector']}, student)
    distill = jnp.abs(l2_normalize(proj) - l2_normalize(target)).mean()
    loss = pixel + self.distill_weight * distill
    return loss, ({'loss': loss, 'loss/pixel': pixel, 'loss/distill': distill}, extra)

  def flops_per_example(self) -> float:
    from moma_jax import flops, masking

    t = self.teacher
    n = masking.num_visible(t.num_patches, self.mask_ratio)
    return super().flops_per_example() + flops.vit_flops(t, n)
