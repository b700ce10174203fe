"""Shared by the trainer tests: a shortened runlocal config with dotted-key overrides."""

from __future__ import annotations

from configs import common


def runlocal_config(name: str, steps: int, checkpoint_every: int, log_every: int, **overrides):
  """configs/<name>.py:runlocal, ``steps`` long, no final k-NN; overrides like 'moma.mask_ratio'."""
  return common.shortened_runlocal(
    name, steps, checkpoint_every=checkpoint_every, log_every=log_every, overrides=overrides
  )
