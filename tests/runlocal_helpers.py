"""Shared by the trainer tests: a shortened runlocal config with dotted-key overrides."""

from __future__ import annotations

import jax

from configs import common
from moma_jax import train

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


def train_one_device(config, workdir, **kw):
  """train.train_and_evaluate on one of the tests' 8 fake CPU devices. On 2 cores the other 7 mostly
  add partitioning work (a 60-step runlocal MAE run: 25 s on 8, 19 s on 1); the tests of sharding
  use all 8 on purpose (test_moma, test_family, test_dino, test_mokd, test_train's resume), and
  test_eval's fine-tuning and probe runs, which were 10% faster on 8."""
  return train.train_and_evaluate(config, workdir, devices=jax.devices()[:1], **kw)
