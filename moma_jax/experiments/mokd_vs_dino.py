r"""MOKD's claim at runlocal size: each model of the MOKD pair (ViT mu/4 + ResNet resnet_mu) after
co-training, against the same model trained alone with DINO for the same budget (same steps, batch,
crops, data and per-model optimizer), on the embedded digits.

  python -m moma_jax.experiments.mokd_vs_dino --workdir=/tmp/mokd_vs_dino   # seeds 0 1 2 (~1 h)
  python -m moma_jax.experiments.mokd_vs_dino --workdir=/tmp/mvd --seeds 0 --steps 4   # smoke test
  python -m moma_jax.experiments.mokd_vs_dino --workdir=/tmp/mvd_sk --recipe sinkhorn
(on 2 CPU cores: a MOKD run ~10 min, DINO alone ~3 min for the ViT and ~6 min for the ResNet;
``--recipe sinkhorn``: the configs' ``runlocal,recipe=sinkhorn``, DINO's small-scale recipe that
does not collapse, 4,500 steps, ~20-60 min per run).

Every run is the configs' own ``main.py`` command (a subprocess, from the repository root), with
only ``--config.seed`` (and ``--steps``) added (``--recipe sinkhorn`` appends ``,recipe=sinkhorn``):
  mokd         configs/mokd.py:runlocal                    k-NN: knn/model (ViT teacher),
                                                                 knn/teacher_cnn (CNN teacher)
  dino_vit     configs/dino_pretrain.py:runlocal           k-NN: knn/model (ViT mu/4 teacher)
  dino_resnet  configs/dino_pretrain.py:runlocal,arch=resnet_mu    knn/model (ResNet teacher)
k-NN (k 20, T 0.07, cosine) and the trainer's linear probe of the EMA teachers' own features
(ViT: CLS token; ResNet: pooled, running BatchNorm statistics; as DINO evaluates, whatever
evaluators.knn.features says) on the 720 test images, the train split as the memory bank (k-NN)
or training set (probe), read from each workdir's final_metrics.json; the
raw-pixel k-NN and chance (10 classes) are the floors. "at init" is the DINO-alone run's teacher at
step 0 (knn/model_before). One difference the configs keep: DINO alone fixes the ViT head's
last-layer norm (norm_last_layer=True, DINO's default); MOKD's ViT head does not (the official
MOKD code). The command is resumable: finished runs are read back from
WORKDIR/results.json (or from a finished run's final_metrics.json), an interrupted run resumes from
its checkpoint. It writes WORKDIR/results.json and WORKDIR/results.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from moma_jax import hardware, storage
from moma_jax.experiments import small_scale  # load_results: the same resumable results.json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 300  # the runlocal configs' own budget
RECIPES = {'runlocal': ('', STEPS), 'sinkhorn': (',recipe=sinkhorn', 4500)}  # suffix, own budget
RUNS = {
  'mokd': 'configs/mokd.py:runlocal',
  'dino_vit': 'configs/dino_pretrain.py:runlocal',
  'dino_resnet': 'configs/dino_pretrain.py:runlocal,arch=resnet_mu',
}
# (label, MOKD run + evaluated features, DINO-alone run + evaluated features)
MODELS = (
  ('ViT mu/4', ('mokd', 'model'), ('dino_vit', 'model')),
  ('ResNet resnet_mu', ('mokd', 'teacher_cnn'), ('dino_resnet', 'model')),
)
PROBES = {'k-NN': 'top1', 'linear': 'linear'}  # knn/<features>/<probe>
BEFORE = 'model_before'  # the run's model at step 0 (MOKD: the ViT; DINO: its backbone)
RAW = 'knn/raw_pixels/top1'
CHANCE = 0.1  # digits: 10 classes


def command(key: str, seed: int, rundir: str, steps: int, recipe: str = 'runlocal') -> list[str]:
  suffix, default_steps = RECIPES[recipe]
  cmd = [sys.executable, 'main.py', f'--config={RUNS[key]}{suffix}', f'--workdir={rundir}',
         f'--config.seed={seed}']  # fmt: skip
  if steps != default_steps:
    cmd += [f'--config.num_train_steps={steps}', f'--config.checkpoint_every={steps}']
  return cmd


def _read_final(rundir: str) -> dict | None:
  path = os.path.join(rundir, 'final_metrics.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    final = json.load(f)['final']
  return {
    'knn': {k: v for k, v in final.items() if k.startswith('knn/')},
    'loss': final.get('loss'),
    'step': final.get('step'),
  }


def execute(key: str, seed: int, steps: int, workdir: str, recipe: str = 'runlocal') -> dict:
  """Trains (or resumes, or reads back) one run; its k-NN numbers and wall time."""
  rundir = os.path.join(workdir, 'runs', key, f'seed{seed}')
  result = _read_final(rundir)
  if result is not None:  # finished before results.json recorded it: no wall time
    return {**result, 'wall_s': None}
  cmd = command(key, seed, rundir, steps, recipe)
  os.makedirs(os.path.dirname(rundir), exist_ok=True)
  log = os.path.join(workdir, 'runs', key, f'seed{seed}.log')
  t0 = time.time()
  with open(log, 'a') as f:
    p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  wall = time.time() - t0
  if p.returncode != 0:
    raise SystemExit(f'error: {" ".join(cmd[1:])} exited with {p.returncode}; see {log}')
  result = _read_final(rundir)
  if result is None:
    raise SystemExit(f'error: {rundir} has no final_metrics.json after training; see {log}')
  return {**result, 'wall_s': wall}


# --- report ----------------------------------------------------------------------------------------


def _stat(values: list[float]) -> str:
  pct = [100 * v for v in values]
  if not pct:
    return '-'
  if len(pct) == 1:
    return f'{pct[0]:.1f}'
  return f'{statistics.mean(pct):.1f} ± {statistics.stdev(pct):.1f}'


def _value(results: dict, key: str, seed: str, metric: str) -> float | None:
  return results.get(key, {}).get(seed, {}).get('knn', {}).get(metric)


def report(state: dict, env: dict) -> str:
  results = state['results']
  seeds = sorted({s for per in results.values() for s in per}, key=int)
  lines = [
    '<!-- written by python -m moma_jax.experiments.mokd_vs_dino -->',
    f'Command: `{env["command"]}`  ',
    f'{state["steps"]} steps x batch 64 per run (recipe {state["recipe"]}), digits (5,748 train '
    f'/ 720 test, 32 px); jax {env["jax"]}, {env["machine"]}.',
    '',
    "Top-1 % on the test split (k-NN: k 20, T 0.07; linear: the trainer's closed-form probe), "
    f'mean ± sample std over seeds {", ".join(seeds)}; Δ = MOKD - DINO alone, per seed (same '
    'seed, same data order).',
    '',
    '| model | probe | at init (step 0) | DINO alone | MOKD (co-trained) | Δ MOKD - DINO | seeds |',
    '|---|---|---|---|---|---|---|',
  ]
  for label, (m_key, m_feat), (d_key, d_feat) in MODELS:
    for probe, suffix in PROBES.items():
      init = [_value(results, d_key, s, f'knn/{BEFORE}/{suffix}') for s in seeds]
      mokd = [_value(results, m_key, s, f'knn/{m_feat}/{suffix}') for s in seeds]
      dino = [_value(results, d_key, s, f'knn/{d_feat}/{suffix}') for s in seeds]
      pairs = [(m, d) for m, d in zip(mokd, dino, strict=True) if m is not None and d is not None]
      lines.append(
        f'| {label} | {probe} | {_stat([v for v in init if v is not None])} | '
        f'{_stat([v for v in dino if v is not None])} | '
        f'{_stat([v for v in mokd if v is not None])} | {_stat([m - d for m, d in pairs])} | '
        f'{len(pairs)} |'
      )
  raw = sorted({r['knn'][RAW] for per in results.values() for r in per.values() if RAW in r['knn']})
  raw_cell = ' / '.join(f'{100 * v:.1f}' for v in raw) if raw else '-'
  chance = f'{100 * CHANCE:.1f}'
  lines += [
    f'| raw pixels (32 px, no training) | k-NN | {raw_cell} | {raw_cell} | {raw_cell} | | |',
    f'| chance (10 classes) | | {chance} | {chance} | {chance} | | |',
  ]
  lines += ['', '| run | seed | k-NN (top-1 %) | final loss | wall s |', '|---|---|---|---|---|']
  for key in RUNS:
    for s in seeds:
      r = results.get(key, {}).get(s)
      if not r:
        continue
      knn = ', '.join(
        f'{k.removeprefix("knn/").removesuffix("/top1")} {100 * v:.1f}'
        for k, v in sorted(r['knn'].items())
        if k != RAW and k.endswith('/top1')  # the linear probes (knn/<name>/linear) are not used
      )
      wall = f'{r["wall_s"]:.0f}' if r['wall_s'] is not None else '-'
      loss = f'{r["loss"]:.3f}' if r['loss'] is not None else '-'
      lines.append(f'| {key} | {s} | {knn} | {loss} | {wall} |')
  walls = [r['wall_s'] for per in results.values() for r in per.values() if r['wall_s']]
  lines += ['', f'Total training wall time: {sum(walls) / 60:.1f} min ({len(walls)} timed runs).']
  return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--workdir', required=True)
  p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='config.seed values')
  p.add_argument('--recipe', choices=list(RECIPES), default='runlocal',
                 help="the configs' runlocal recipe, or runlocal,recipe=sinkhorn")  # fmt: skip
  p.add_argument('--steps', type=int, default=None, help="training steps per run (the recipe's)")
  p.add_argument('--runs', nargs='+', choices=list(RUNS), default=list(RUNS))
  a = p.parse_args(argv)
  hardware.quiet_libtpu()  # before JAX starts: no libtpu start-up errors without a TPU
  workdir = os.path.abspath(a.workdir)
  os.makedirs(workdir, exist_ok=True)
  res_path = os.path.join(workdir, 'results.json')
  default_steps = RECIPES[a.recipe][1]
  a.steps = a.steps or default_steps
  state = small_scale.load_results(res_path, a.steps, a.recipe)
  state.pop('seeds', None)
  results = state['results']
  t_start = time.time()
  for seed in a.seeds:  # seed-major: an interrupted command leaves whole seeds behind
    for key in a.runs:
      if str(seed) in results.get(key, {}):
        continue
      print(f'[{time.time() - t_start:6.0f}s] {key} seed {seed}', flush=True)
      res = execute(key, seed, a.steps, workdir, a.recipe)
      results.setdefault(key, {})[str(seed)] = res
      knn = ', '.join(f'{k} {100 * v:.1f}%' for k, v in sorted(res['knn'].items()))
      wall = f'{res["wall_s"]:.0f}s' if res['wall_s'] is not None else 'read back'
      print(f'  {knn} ({wall})', flush=True)
      storage.write_text_atomic(res_path, json.dumps(state, indent=1))
  env = {
    'command': 'python -m moma_jax.experiments.mokd_vs_dino --workdir=DIR --seeds '
    + ' '.join(map(str, a.seeds))
    + (f' --recipe {a.recipe}' if a.recipe != 'runlocal' else '')
    + (f' --steps {a.steps}' if a.steps != default_steps else ''),
    'jax': importlib.metadata.version('jax'),
    'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores',
  }
  state['env'] = env
  text = report(state, env)
  storage.write_text_atomic(os.path.join(workdir, 'results.md'), text)
  storage.write_text_atomic(res_path, json.dumps(state, indent=1))
  print(text)
  print('wrote', os.path.join(workdir, 'results.md'))
  return state


if __name__ == '__main__':
  main()
