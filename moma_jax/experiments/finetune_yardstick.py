r"""The paper's own yardstick on the embedded digits: fine-tuning top-1 of README command 1's
student before and after distillation, against the same fine-tuning from scratch.

  python -m moma_jax.experiments.finetune_yardstick --workdir=/tmp/fty              # ~25 min, 2 cores
  python -m moma_jax.experiments.finetune_yardstick --workdir=/tmp/fty --seeds 1 --steps 20

Per seed s:
  distil   README command 1 (configs/moco_to_mae.py:runlocal, seed s) -> WORKDIR/distil/seed{s}
           (or ``--distilled DIR_WITH_{seed}``: reuse command-1 runs made elsewhere);
  fine-tune configs/finetune.py:runlocal (digits, batch 128, the same budget and seed for every
           init) from three encoders: random init ('scratch'), the shipped MAE mu student as
           command 1 starts from ('before'), and its distilled export ('after').
Top-1 on digits' held-out test split, from the fine-tuning run's own classification evaluator.
The command is resumable: finished runs are read back from WORKDIR/results.json; it writes
WORKDIR/results.md beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from moma_jax import hardware, storage
from moma_jax.experiments import small_scale, teachers

INITS = ('scratch', 'before', 'after')
LABELS = {
  'scratch': 'random init mu/4 (fine-tuning from scratch)',
  'before': 'MAE mu, command 1 student before distillation',
  'after': 'MAE mu after command 1 (MoCo v3 -> MAE, small-scale recipe)',
}


def distil(seed: int, rundir: str) -> str:
  """README command 1 with ``seed``; returns its exported encoder."""
  from configs import moco_to_mae
  from moma_jax import train

  export = os.path.join(rundir, 'export', 'model')
  if not os.path.isdir(export):
    c = moco_to_mae.get_config('runlocal')
    c.seed = seed
    train.train_and_evaluate(c, rundir)
  return export


def finetune(checkpoint: str, seed: int, steps: int | None, rundir: str) -> float:
  """configs/finetune.py:runlocal from ``checkpoint`` ('' = from scratch); its final top-1."""
  from configs import finetune as finetune_config
  from moma_jax import train

  c = finetune_config.get_config(f'runlocal,checkpoint={checkpoint}' if checkpoint else 'runlocal')
  c.seed = seed
  if steps:
    c.num_train_steps = steps
  final = train.train_and_evaluate(c, rundir)
  return float(final['eval/top1'])


def report(results: dict, env: dict) -> str:
  lines = [
    '# Fine-tuning yardstick (digits, configs/finetune.py:runlocal)',
    '',
    f'`{env["command"]}`; {env["steps"]} fine-tuning steps per run; total {env["total_min"]:.0f} '
    'min. Top-1 % on the held-out test split, mean ± std over seeds.',
    '',
    '| fine-tuned from | seeds | top-1 % | per seed |',
    '|---|---|---|---|',
  ]
  for init in INITS:
    per = results.get(init, {})
    if not per:
      continue
    vals = [per[s]['top1'] for s in sorted(per)]
    each = ', '.join(f'{100 * v:.1f}' for v in vals)
    lines.append(f'| {LABELS[init]} | {len(vals)} | {small_scale.summary(vals)} | {each} |')
  return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--workdir', required=True)
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--steps', type=int, default=0, help="fine-tuning steps (0: runlocal's 600)")
  p.add_argument('--distilled', default='', help='reuse command-1 run directories: a path with '
                 '{seed}, e.g. /tmp/c1/s{seed} (default: distil into WORKDIR/distil/seed{seed})')  # fmt: skip
  a = p.parse_args(argv)
  if a.distilled and '{seed}' not in a.distilled:
    raise SystemExit(f'error: --distilled {a.distilled!r} has no {{seed}}; e.g. /tmp/c1/s{{seed}}')
  hardware.quiet_libtpu()  # before JAX starts: no libtpu start-up errors without a TPU
  before = teachers.path('mae_mu')
  if not os.path.isfile(before):
    raise SystemExit(
      f'error: shipped teacher missing: {before}; run python -m moma_jax.experiments.teachers'
    )
  os.makedirs(a.workdir, exist_ok=True)
  res_path = os.path.join(a.workdir, 'results.json')
  state = {'steps': a.steps, 'results': {}}
  if os.path.isfile(res_path):
    with open(res_path) as f:
      state = json.load(f)
    if state['steps'] != a.steps:
      raise SystemExit(f'error: {res_path} holds runs of --steps {state["steps"]}, not {a.steps}; '
                       'use another --workdir')  # fmt: skip
  results = state['results']
  t0 = time.time()
  for seed in range(a.seeds):
    for init in INITS:
      if str(seed) in results.get(init, {}):
        continue
      if init == 'after':
        rundir = (
          a.distilled.format(seed=seed)
          if a.distilled
          else os.path.join(a.workdir, 'distil', f'seed{seed}')
        )
        checkpoint = distil(seed, rundir)
      else:
        checkpoint = before if init == 'before' else ''
      print(f'[{time.time() - t0:6.0f}s] fine-tune from {init}, seed {seed}', flush=True)
      t = time.time()
      top1 = finetune(
        checkpoint, seed, a.steps, os.path.join(a.workdir, 'finetune', init, f'seed{seed}')
      )
      results.setdefault(init, {})[str(seed)] = {'top1': top1, 'wall_s': time.time() - t}
      print(f'  top-1 {100 * top1:.1f}%', flush=True)
      storage.write_text_atomic(res_path, json.dumps(state))
  from configs import finetune as finetune_config

  total = sum(r['wall_s'] for per in results.values() for r in per.values())
  env = {
    'command': 'python -m moma_jax.experiments.finetune_yardstick --workdir=DIR '
    f'--seeds {a.seeds}' + (f' --steps {a.steps}' if a.steps else ''),
    'steps': a.steps or finetune_config.get_config('runlocal').num_train_steps,
    'total_min': total / 60,
  }
  text = report(results, env)
  storage.write_text_atomic(os.path.join(a.workdir, 'results.md'), text)
  print(text)
  return state


if __name__ == '__main__':
  main()
