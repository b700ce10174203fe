r"""The trainer's command line: python main.py --config=configs/moco_to_mae.py[:ARGS] --workdir=DIR,
or, after `pip install -e .`, from any directory: moma-train --config=moco_to_mae[:ARGS] --workdir=DIR
(a --config that is not a file is looked up among the project's configs/).

Every config value can be overridden: --config.moma.mask_ratio=0.85 (a misspelt key is an error).
On a multi-host TPU pod slice or a multi-node GPU cluster, pass --jax_distributed (the same command
on every host). Re-running the same command in the same workdir resumes from its last checkpoint.
--dry_run checks a command (config, data, checkpoints, model, optimizer) without training or
writing anything. --plan=v5litepod-8 (any Cloud TPU accelerator type or libtpu topology, or
local) compiles the step for that hardware without having it and prints whether it fits, the
roofline speed and the schedule's duration (moma_jax/plan.py); it needs no --workdir.
"""

from __future__ import annotations

import importlib.util
import logging as logging_std
import os
import sys

# TensorFlow's C++ INFO lines (oneDNN notices), before anything imports it; -v 1 does not undo it.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file[:args]', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'where checkpoints, metrics and exports go')
_DISTRIBUTED = flags.DEFINE_bool(
  'jax_distributed', False, 'call jax.distributed.initialize() (multi-host TPU / GPU clusters)'
)
_DRY_RUN = flags.DEFINE_bool(
  'dry_run',
  False,
  'check the command and stop before training: validate the config, open the dataset, load every '
  'checkpoint and build the model and optimizer, print the plan; nothing is written',
)
_PLAN = flags.DEFINE_string(
  'plan',
  None,
  'compile the train step for this hardware without having it and print the plan (memory per '
  'chip, FLOPs, roofline speed, schedule time), training nothing: a Cloud TPU accelerator type '
  '(v4-8, v5litepod-8, v5p-8, v6e-8), a libtpu topology (v5e:2x4, v5p:2x2x1), ",slices=N" for '
  'multi-slice, or "local" (this machine\'s devices); needs libtpu for TPUs (pip install -e .[tpu])',
)
_PLAN_JSON = flags.DEFINE_string('plan_json', None, 'with --plan: also write the plan as JSON here')
flags.mark_flag_as_required('config')


def _usage_error(message: str) -> None:
  """One line on stderr and exit code 2: what was wrong with the command line."""
  print(f'error: {" ".join(message.split())}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with every command-line mistake (a misspelt --config key, a bad value, a
  config argument get_config rejects) reported in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and 'Traceback' in str(e):  # get_config(arg) raised: keep its last line
      flag = lines[0].split(': ')[0].removeprefix('flag ')
      _usage_error(f'{flag}: {lines[-1].split(": ", 1)[-1]}')
    _usage_error(str(e))
  except OSError as e:  # the config file itself
    _usage_error(f'--config: {e}')
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key that is not there
    # ml_collections names only the missing component ('total_steps'); name the user's flag.
    inner = e
    while isinstance(inner, BaseException) and inner.args:  # AttributeError(KeyError('name\n...'))
      inner = inner.args[0]
    name = str(inner).split('\n')[0].strip('"\'')
    overrides = [a.split('=')[0] for a in argv if a.startswith('--config.')]
    key = next((k for k in overrides if name in k[len('--config.') :].split('.')), None)
    key = key or (overrides[0] if overrides else '--config.KEY')
    _usage_error(f'{key}: no such config key.{_suggest(argv, key[len("--config.") :])}')
  return []


def _config_keys(argv: list[str]) -> list[str]:
  """Every dotted key of the --config file's config (for suggestions; [] if it cannot load)."""
  from moma_jax import validate

  arg = next((a[len('--config=') :] for a in argv if a.startswith('--config=')), '')
  path, _, args = arg.partition(':')
  try:
    spec = importlib.util.spec_from_file_location('_config_for_keys', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(validate.flatten_config(module.get_config(args or None)))
  except Exception:  # noqa: BLE001  (only a hint: the error line is printed either way)
    return []


# What other trainers call a key (big_vision, MaxText, timm, torch scripts) -> this project's name.
_ALIASES = {
  'total_steps': 'num_train_steps', 'num_steps': 'num_train_steps', 'steps': 'num_train_steps',
  'max_steps': 'num_train_steps', 'epochs': 'num_epochs', 'lr': 'optim.base_lr',
  'learning_rate': 'optim.base_lr', 'base_lr': 'optim.base_lr', 'weight_decay': 'optim.weight_decay',
  'wd': 'optim.weight_decay', 'mask_ratio': 'moma.mask_ratio', 'image_size': 'data.image_size',
  'dataset': 'data.name', 'data_dir': 'data.data_dir',
}  # fmt: skip


def _suggest(argv: list[str], key: str) -> str:
  """' Did you mean ...?' from the config's own keys (a known alias, as total_steps ->
  num_train_steps, then close spellings), else where the keys are defined."""
  import difflib

  keys = _config_keys(argv)
  alias = _ALIASES.get(key) or _ALIASES.get(key.split('.')[-1])
  close = [alias] if alias in keys else []
  close += difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
  close = list(dict.fromkeys(close))[:3]
  if close:
    return ' Did you mean ' + ' or '.join(f'--config.{k}' for k in close) + '?'
  return ' The keys are those set in the --config file and configs/common.py.'


class _OwnInfoOnly(logging_std.Filter):
  """Keeps warnings and errors from everyone, but INFO lines only from this project: orbax,
  tensorstore, clu and friends log hundreds of INFO lines per run (pass -v 1 to see them). Orbax's
  own errors are dropped too: every failure of a save reaches the user as the one-line error of
  moma_jax.checkpointing (a full disk otherwise printed four tracebacks, 336 lines)."""

  def __init__(self):
    super().__init__()
    import convert
    import moma_jax

    self._ours = tuple(
      os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (moma_jax, convert)
    )

  def filter(self, record: logging_std.LogRecord) -> bool:
    if record.pathname.startswith(self._ours):
      return True
    orbax = f'{os.sep}orbax{os.sep}' in record.pathname or record.name == 'asyncio'  # its tasks
    return record.levelno >= logging_std.WARNING and not orbax


def _resolve_config_arg(argv: list[str]) -> list[str]:
  """--config=NAME[.py][:ARGS] -> the file in the project's configs/ when NAME is not a file here."""
  import configs

  out = []
  for a in argv:
    if a.startswith('--config='):
      path, colon, args = a[len('--config=') :].partition(':')
      if not os.path.isfile(path):
        name = os.path.basename(path)
        candidate = os.path.join(
          os.path.dirname(configs.__file__), name if name.endswith('.py') else f'{name}.py'
        )
        if not os.path.isfile(candidate):  # absl would defer this error to the first use
          _usage_error(
            f'--config={path}: no such config file; give a path such as '
            'configs/moco_to_mae.py[:ARGS] or the name of one in configs/, e.g. moco_to_mae'
          )
        a = f'--config={candidate}{colon}{args}'
    out.append(a)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from moma_jax import validate

  config = _CONFIG.value
  if _PLAN_JSON.value and _PLAN.value is None:
    _usage_error('--plan_json: only with --plan=TARGET')
  if _PLAN.value is None and not _WORKDIR.value:
    _usage_error('--workdir: give a directory for checkpoints, metrics and exports')
  try:  # before JAX is imported and before anything is written
    validate.validate(config, None if _PLAN.value else _WORKDIR.value)
  except validate.ConfigError as e:
    _usage_error(str(e))
  # TensorFlow's first import, quiet, whichever module below reaches it first (train.py, plan.py
  # and the data pipeline import it through tf_quiet too; this keeps the order for the command).
  from moma_jax.data import tf_quiet  # noqa: F401

  if flags.FLAGS.verbosity < 1:
    logging.get_absl_handler().python_handler.addFilter(_OwnInfoOnly())
  if _PLAN.value is not None:
    _plan(config, _PLAN.value, _PLAN_JSON.value)
    return
  import jax

  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from moma_jax import checkpointing, train

  logging.info(
    'JAX %s, %d processes, devices: %s', jax.__version__, jax.process_count(), jax.devices()
  )
  try:
    final = train.train_and_evaluate(config, _WORKDIR.value, dry_run=_DRY_RUN.value)
  except ValueError as e:  # bad input found by the trainer (data, checkpoint shapes): usage
    _usage_error(str(e))
  except (OSError, train.NonFiniteError) as e:  # a full disk, a lost bucket, diverged training
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    if isinstance(e, checkpointing.CheckpointWriteError):
      # Orbax's failed write tasks and their event loops print tracebacks while the interpreter
      # shuts down; the earlier checkpoints are complete on disk, so leave without that shutdown.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(1)
    sys.exit(1)
  if jax.process_index() == 0 and final.get('summary'):
    print('\n'.join(final['summary']))


def _plan(config, where: str, json_path: str | None) -> None:
  """--plan: compile for ``where`` and print the plan; exit 1 with one line when it does not fit."""
  from moma_jax import hardware

  if where != 'local':
    try:
      target = hardware.parse_target(where)
    except ValueError as e:
      _usage_error(str(e))
    if importlib.util.find_spec('libtpu') is None:
      _usage_error(
        f'--plan={where}: compiling for a TPU needs libtpu; pip install -e .[tpu] (or '
        '"jax[tpu]==<your jax version>")'
      )
    hardware.plan_environment(target)  # before JAX starts
  from moma_jax import plan

  try:
    result = plan.make_plan(config, where)
  except ValueError as e:  # a config the set-up refuses (batch vs chips, sizes, checkpoints)
    _usage_error(str(e))
  except plan.DoesNotFit as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print('\n'.join(plan.format_plan(result)))
  if json_path:
    plan.write_json(result, json_path)


def run() -> None:
  """Console-script entry point (moma-train) and main.py's."""
  from moma_jax import hardware

  hardware.quiet_libtpu()
  app.run(main, argv=_resolve_config_arg(sys.argv), flags_parser=parse_flags)


if __name__ == '__main__':
  run()
