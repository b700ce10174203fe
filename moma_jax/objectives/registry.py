"""The objectives of the one trainer, by the name a config gives (``config.objective``): for each,
its builder, its config checks and the optimizer rules that apply to it. Nothing outside this
table chooses by objective name.

Builders and checks are named as 'module:function' and imported when first called: the command
line validates a config through this table before JAX is imported (the checks are JAX-free, the
builders are not), and no module the builders import has to import the builders back.

Adding an objective: its module in moma_jax/objectives/ (the :class:`Objective` protocol of
objectives/__init__.py), a builder ``(config, sizes, loader) -> (objective, frozen, start params or
None, notes)``, a check ``(config) -> None`` raising validate.ConfigError, and one line below.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What a builder may need from the data, the schedule and the devices."""

  num_classes: int
  total_steps: int
  steps_per_epoch: int | None = None  # None: the builder reads the dataset (DINO / MOKD schedules)
  # the platform the step will run on: the mesh's ('tpu' in a plan for a TPU, whatever this host is)
  platform: str = 'cpu'


@dataclasses.dataclass(frozen=True)
class Entry:
  builder: str  # 'module:function' (config, Sizes, loader) -> (objective, frozen, start, notes)
  check: str  # 'module:function' (config) -> None, before JAX starts
  # optim.layer_decay (MAE's fine-tuning rule) applies: the objective trains a 'model' ViT whose
  # blocks optim.layer_decay_scales reads ('model/blocks_i/...')
  layer_decay: bool = False
  # the objective builds its optimizer and schedules from its own config sections
  # (objective.make_optimizer: DINO's weight-decay schedule, MOKD's two models)
  own_optimizer: bool = False
  labelled: bool = False  # trains on the labels (the classes must be >= 2 whatever the evaluators)
  multi_crop: bool = False  # views of several sizes (global and local crops), not one image size


_PRETRAIN = dict(
  builder='moma_jax.builders:build_pretraining', check='moma_jax.validate:check_pretraining'
)
OBJECTIVES: dict[str, Entry] = {
  'moma': Entry('moma_jax.builders:build_moma', 'moma_jax.validate:check_moma'),
  'classification': Entry(
    'moma_jax.builders:build_classification',
    'moma_jax.validate:check_classification',
    layer_decay=True,
    labelled=True,
  ),  # fmt: skip
  'mae': Entry(**_PRETRAIN),
  'mocov3': Entry(**_PRETRAIN),
  'dmae': Entry(**_PRETRAIN),
  'rc_mae': Entry(**_PRETRAIN),
  'dino': Entry(
    'moma_jax.builders_dino:build_dino',
    'moma_jax.validate:check_dino',
    own_optimizer=True,
    multi_crop=True,
  ),
  'mokd': Entry(
    'moma_jax.builders_dino:build_mokd',
    'moma_jax.validate:check_mokd',
    own_optimizer=True,
    multi_crop=True,
  ),
}


def entry(name: str) -> Entry:
  if name not in OBJECTIVES:
    raise ValueError(f'unknown objective {name!r}; one of {", ".join(OBJECTIVES)}')
  return OBJECTIVES[name]


def _resolve(ref: str) -> Callable[..., Any]:
  module, function = ref.split(':')
  return getattr(importlib.import_module(module), function)


def check(config: Any) -> None:
  """The objective's own config checks (validate.validate runs them after the common ones)."""
  _resolve(entry(config.objective).check)(config)


def build_objective(
  config: Any,
  num_classes: int,
  total_steps: int,
  steps_per_epoch: int | None = None,
  loader: Any = None,
  platform: str = 'cpu',
) -> tuple[Any, dict[str, Any], Any, list[str]]:
  """(objective, frozen, start params or None, notes) for ``config.objective``. ``loader``:
  builders.ARRAYS (a run) or builders.SHAPES (a plan); None is ARRAYS. ``platform``: the mesh's."""
  build = _resolve(entry(config.objective).builder)
  sizes = Sizes(num_classes, total_steps, steps_per_epoch, platform)
  return build(config, sizes) if loader is None else build(config, sizes, loader)
