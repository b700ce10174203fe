r"""MOKD's claim at runlocal size: each model of the MOKD pair (ViT mu/4 + ResNet resnet_mu) after
co-training, against the same model trained alone with DINO for the same budget (same steps, batch,
crops, data and per-model optimizer), on the embedded digits.

  python -m moma_jax.experiments.mokd_vs_dino --workdir=/tmp/mokd_vs_dino   # seeds 0 1 2 (~1 h)
  python -m moma_jax.experiments.mokd_vs_dino --workdir=/tmp/mvd --seeds 0 --steps 4   # smoke test
(on 2 CPU cores: a MOKD run ~10 min, DINO alone ~3 min for the ViT and ~6 min for the ResNet).

Every run is the configs' own ``main.py`` command (a subprocess, from the repository root), with
only ``--config.seed`` (and ``--steps``) added:
  mokd         configs/mokd.py:runlocal                    k-NN: knn/model (ViT teacher),
                                                                 knn/teacher_cnn (CNN teacher)
  dino_vit     configs/dino_pretrain.py:runlocal           k-NN: knn/model (ViT mu/4 teacher)
  dino_resnet  configs/dino_pretrain.py:runlocal,arch=resnet_mu    knn/model (ResNet teacher)
k-NN (k 20, T 0.07, cosine) of the EMA teachers' own features (ViT: CLS token; ResNet: pooled,
running BatchNorm statistics; as DINO evaluates, whatever evaluators.knn.features says) on the 720
test images, the train split as the memory bank, read from each workdir's final_metrics.json; the
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
RUNS = {
  'mokd': 'configs/mokd.py:runlocal',
  'dino_vit': 'configs/dino_pretrain.py:runlocal',
  'dino_resnet': 'configs/dino_pretrain.py:runlocal,arch=resnet_mu',
}
# (label, MOKD run + k-NN key, DINO-alone run + k-NN key)
MODELS = (
  ('ViT mu/4', ('mokd', 'knn/model/top1'), ('dino_vit', 'knn/model/top1')),
  ('ResNet resnet_mu', ('mokd', 'knn/teacher_cnn/top1'), ('dino_resnet', 'knn/model/top1')),
)
BEFORE = 'knn/model_before/top1'  # the run's model at step 0 (MOKD: the ViT; DINO: its backbone)
RAW = 'knn/raw_pixels/top1'
CHANCE = 0.1  # digits: 10 classes


def command(key: str, seed: int, rundir: str, steps: int) -> list[str]:
  cmd = [sys.executable, 'main.py', f'--config={RUNS[key]}', f'--workdir={rundir}',
         f'--config.seed={seed}']  # fmt: skip
  if steps != STEPS:
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


def execute(key: str, seed: int, steps: int, workdir: str) -> dict:
  """Trains (or resumes, or reads back) one run; its k-NN numbers and wall time."""
  rundir = os.path.join(workdir, 'runs', key, f'seed{seed}')
  result = _read_final(rundir)
  if result is not None:  # finished before results.json recorded it: no wall time
    return {**result, 'wall_s': None}
  cmd = command(key, seed, rundir, steps)
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
    f'{state["steps"]} steps x batch 64 per run, digits (5,748 train / 720 test, 32 px); '
    f'jax {env["jax"]}, {env["machine"]}.',
    '',
    'k-NN top-1 % on the test split (k 20, T 0.07), mean ± sample std over seeds '
    f'{", ".join(seeds)}; Δ = MOKD - DINO alone, per seed (same seed, same data order).',
    '',
    '| model | at init (step 0) | DINO alone | MOKD (co-trained) | Δ MOKD - DINO | seeds |',
    '|---|---|---|---|---|---|',
  ]
  for label, (m_key, m_metric), (d_key, d_metric) in MODELS:
    init = [_value(results, d_key, s, BEFORE) for s in seeds]
    mokd = [_value(results, m_key, s, m_metric) for s in seeds]
    dino = [_value(results, d_key, s, d_metric) for s in seeds]
    pairs = [(m, d) for m, d in zip(mokd, dino, strict=True) if m is not None and d is not None]
    lines.append(
      f'| {label} | {_stat([v for v in init if v is not None])} | '
      f'{_stat([v for v in dino if v is not None])} | {_stat([v for v in mokd if v is not None])} | '
      f'{_stat([m - d for m, d in pairs])} | {len(pairs)} |'
    )
  raw = sorted({r['knn'][RAW] for per in results.values() for r in per.values() if RAW in r['knn']})
  raw_cell = ' / '.join(f'{100 * v:.1f}' for v in raw) if raw else '-'
  chance = f'{100 * CHANCE:.1f}'
  lines += [
    f'| raw pixels (32 px, no training) | {raw_cell} | {raw_cell} | {raw_cell} | | |',
    f'| chance (10 classes) | {chance} | {chance} | {chance} | | |',
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
  p.add_argument('--steps', type=int, default=STEPS, help='training steps per run')
  p.add_argument('--runs', nargs='+', choices=list(RUNS), default=list(RUNS))
  a = p.parse_args(argv)
  hardware.quiet_libtpu()  # before JAX starts: no libtpu start-up errors without a TPU
  workdir = os.path.abspath(a.workdir)
  os.makedirs(workdir, exist_ok=True)
  res_path = os.path.join(workdir, 'results.json')
  state = small_scale.load_results(res_path, a.steps)
  state.pop('seeds', None)
  results = state['results']
  t_start = time.time()
  for seed in a.seeds:  # seed-major: an interrupted command leaves whole seeds behind
    for key in a.runs:
      if str(seed) in results.get(key, {}):
        continue
      print(f'[{time.time() - t_start:6.0f}s] {key} seed {seed}', flush=True)
      res = execute(key, seed, a.steps, workdir)
      results.setdefault(key, {})[str(seed)] = res
      knn = ', '.join(f'{k} {100 * v:.1f}%' for k, v in sorted(res['knn'].items()))
      wall = f'{res["wall_s"]:.0f}s' if res['wall_s'] is not None else 'read back'
      print(f'  {knn} ({wall})', flush=True)
      storage.write_text_atomic(res_path, json.dumps(state, indent=1))
  env = {
    'command': 'python -m moma_jax.experiments.mokd_vs_dino --workdir=DIR --seeds '
    + ' '.join(map(str, a.seeds))
    + (f' --steps {a.steps}' if a.steps != STEPS else ''),
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
