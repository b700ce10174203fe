"""The tiny teachers shipped in teachers/ (made by moma_jax/experiments/teachers.py): their names,
files and recipes, where both the configs (runlocal's default teachers) and the experiments read
them. Not a config itself."""

from __future__ import annotations

import dataclasses
import os

# realpath: the same files under one name however the package was reached (symlinks, installs), so
# a workdir's experiment fingerprint does not change with the way the trainer was started.
TEACHER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), 'teachers')


@dataclasses.dataclass(frozen=True)
class Recipe:
  config: str  # config module under configs/
  variant: str
  steps: int
  file: str  # file name under teachers/


# The size ladder pico < mu < milli plays S < B < L of the paper's Table 3.
RECIPES = {
  'mae_mu': Recipe('mae_pretrain', 'mu/4', 1200, 'mae_mu4_digits.pth'),
  'mae_milli': Recipe('mae_pretrain', 'milli/4', 1200, 'mae_milli4_digits.pth'),
  'mocov3_mu': Recipe('mocov3_pretrain', 'mu/4', 1000, 'mocov3_mu4_digits.pth.tar'),
  'mocov3_pico': Recipe('mocov3_pretrain', 'pico/4', 1000, 'mocov3_pico4_digits.pth.tar'),
  # Not self-supervised: a ViT trained with the labels, the strong teacher of the mechanism check
  # (docs/results.md), which must not depend on how good the SSL teachers are.
  'supervised_mu': Recipe('finetune', 'mu/4', 600, 'supervised_mu4_digits.pth'),
}


def path(name: str) -> str:
  """Absolute path of a shipped teacher file (RECIPES key, e.g. 'mocov3_mu')."""
  return os.path.join(TEACHER_DIR, RECIPES[name].file)
