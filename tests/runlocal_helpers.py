"""Shared by the trainer tests: a shortened runlocal config with dotted-key overrides."""

from __future__ import annotations

import importlib

from configs import common


def runlocal_config(name: str, steps: int, checkpoint_every: int, log_every: int, **overrides):
  """configs/<name>.py:runlocal, ``steps`` long, no final k-NN; overrides like 'moma.mask_ratio'."""
  c = importlib.import_module(f'configs.{name}').get_config('runlocal')
  c.num_train_steps = steps
  c.log_every = log_every
  c.checkpoint_every = checkpoint_every
  c.evaluators.knn.at_end = False
  return common.override(c, overrides)
