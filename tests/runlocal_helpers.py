"""Shared by the trainer tests: a shortened runlocal config with dotted-key overrides."""

from __future__ import annotations

from configs import common

# For the tests' JAX subprocesses (which set their own XLA_FLAGS): LLVM -O1 for XLA's CPU code, as
# conftest.py sets for the test processes. Only compile time depends on it (2-6x less for these
# small programs); steps run about as fast and compute the same numbers.
FAST_COMPILE = '--xla_backend_optimization_level=1'

# The tests of machinery (resume, checkpoints, signals, progress) run MoCo -> MAE with the paper's
# loss: its 10% of visible patches make a step about half the small-scale recipe's, and what they
# test does not depend on the loss.
M2M_PAPER = 'moco_to_mae:recipe=paper'


def runlocal_config(name: str, steps: int, checkpoint_every: int, log_every: int, **overrides):
  """configs/<name>.py:runlocal, ``steps`` long, no final k-NN; overrides like 'moma.mask_ratio'."""
  return common.shortened_runlocal(
    name, steps, checkpoint_every=checkpoint_every, log_every=log_every, overrides=overrides
  )
