r"""The Cloud TPU table of docs/tpu.md: every shipped full config planned (--plan) for several TPU
slices in float32 and bfloat16 compute, one fresh process per plan, without a TPU.

  python benchmarks/tpu_plans.py --out benchmarks/results/tpu            # plans missing ones
  python benchmarks/tpu_plans.py --only moco_to_mae --targets v5p-8      # some of them
  python benchmarks/tpu_plans.py --out benchmarks/results/tpu --table    # markdown from the JSONs

Each plan is ``python main.py --config=CONFIG --plan=TARGET --plan_json=...`` (the command users
run), so the table is what they would see. Resumable: a plan whose JSON exists is not redone,
unless it predates the HBM-only traffic count (``hbm_traffic_per_chip``). A step that does not fit
is recorded with the command's one-line error. Each full-depth compile
takes 1-5 min and 3-7 GiB of host RAM on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Compute dtypes: 'default' is the config's own (pre-training: float32); 'bfloat16' / 'float32' set
# every model's compute dtype, 'bf16teacher' only the frozen teachers'. Parameters and optimizer
# stay float32 throughout. MOMA's rows name the teachers' attention: XLA's, or '_flash' the Pallas
# TPU flash kernel; the shipped MOMA default is 'bf16teacher_flash' (a bf16 teacher, and
# teacher_attention='auto', which is flash on a TPU, with a float32 student).
XLA, FLASH = ('--config.teacher_attention=xla',), ('--config.teacher_attention=flash',)
DTYPES = {
  'moma': {
    'bf16teacher': ('--config.teacher_dtype=bfloat16', *XLA),
    'bfloat16': ('--config.student.dtype=bfloat16', '--config.teacher_dtype=bfloat16', *XLA),
    'float32': ('--config.student.dtype=float32', '--config.teacher_dtype=float32', *XLA),
    'bf16teacher_flash': ('--config.teacher_dtype=bfloat16', *FLASH),
    'bfloat16_flash': (
      '--config.student.dtype=bfloat16',
      '--config.teacher_dtype=bfloat16',
      *FLASH,
    ),
    'float32_flash': ('--config.student.dtype=float32', '--config.teacher_dtype=float32', *FLASH),
  },
  'pretrain': {
    'default': (),
    'bfloat16': ('--config.model.dtype=bfloat16',),
    'float32': ('--config.model.dtype=float32',),
  },
}
CONFIGS = {  # name -> (config argument, kind)
  'moco_to_mae': ('moco_to_mae', 'moma'),  # MoCo v3 B/16 -> MAE B/16
  'mae_to_moco': ('mae_to_moco', 'moma'),  # MAE B/16 -> MoCo v3 B/16
  'mae_to_moco L->B': ('mae_to_moco', 'moma'),  # Table 1 / 3: MAE L/16 teacher
  'multi_teacher': ('multi_teacher', 'moma'),  # MAE + MoCo B/16 -> random B/16
  'mae_pretrain': ('mae_pretrain', 'pretrain'),
  'mocov3_pretrain': ('mocov3_pretrain', 'pretrain'),
}
EXTRA = {'mae_to_moco L->B': ('--config.teachers.mae.variant=L/16',)}
TARGETS = ('v5litepod-8', 'v4-8', 'v5p-8', 'v5litepod-256', 'v5litepod-1')
FIRST = {'moma': 'bf16teacher_flash', 'pretrain': 'default'}  # the rows every config has
ORDER = [  # most wanted first: a sweep stopped early still answers the main questions
  *[(c, t, FIRST[CONFIGS[c][1]]) for c in CONFIGS for t in TARGETS],
  *[(c, t, 'bf16teacher') for c in CONFIGS if CONFIGS[c][1] == 'moma' for t in TARGETS],
  *[('moco_to_mae', t, d) for d in ('bfloat16', 'float32') for t in TARGETS[:3]],
  *[
    (c, t, d)
    for c in ('moco_to_mae', 'mae_to_moco L->B')
    for d in ('bf16teacher_flash', 'bfloat16_flash', 'float32_flash')
    for t in ('v5litepod-8', 'v5p-8')
  ],  # issue 28 item 5's cells
  *[(c, t, d) for c in CONFIGS for d in DTYPES[CONFIGS[c][1]] for t in TARGETS],
]
ORDER = list(dict.fromkeys(ORDER))


SMALL = ' (†)'  # few images per chip: a step of fixed costs the roofline does not see (docs/tpu.md)


def _short(seconds: float) -> str:
  """A duration in the table's units: s below a minute, min below an hour, else h."""
  if seconds < 60:
    return f'{seconds:.0f} s'
  return f'{seconds / 60:.1f} min' if seconds < 3600 else f'{seconds / 3600:.1f} h'


def _current(plan: dict) -> bool:
  """Planned with the HBM-only traffic count (older plans put XLA's bytes accessed in every
  memory space into the roofline; a refusal does not depend on it)."""
  return 'error' in plan or 'hbm_traffic_per_chip' in plan


def _file(out: str, config: str, target: str, dtype: str) -> str:
  return os.path.join(out, f'{config.replace(" ", "_").replace(">", "")}__{target}__{dtype}.json')


def run_one(out: str, config: str, target: str, dtype: str) -> None:
  arg, kind = CONFIGS[config]
  path = _file(out, config, target, dtype)
  cmd = [
    sys.executable, os.path.join(ROOT, 'main.py'), f'--config={arg}', f'--plan={target}',
    f'--plan_json={path}', *EXTRA.get(config, ()), *DTYPES[kind][dtype],
  ]  # fmt: skip
  t0 = time.perf_counter()
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  wall = time.perf_counter() - t0
  if r.returncode != 0:  # does not fit (exit 1), or a failure worth reading
    err = (r.stderr.strip().splitlines() or ['?'])[-1]
    with open(path, 'w') as f:
      json.dump({'config': config, 'target': target, 'fits': False, 'error': err, 'wall': wall}, f)
  else:
    with open(path) as f:
      plan = json.load(f)
    plan.update(config=config, dtype=dtype, wall=wall)
    with open(path, 'w') as f:
      json.dump(plan, f, indent=1)
  print(f'{config} {target} {dtype}: rc {r.returncode} in {wall:.0f} s', flush=True)


def table(out: str) -> str:
  rows = [
    '| config | compute | target | fits | GiB / chip | roofline step | images/s | epoch | '
    'schedule | FLOP per HBM byte (ridge) | MFU bound | largest batch / chip (est.) |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for config, target, dtype in sorted(
    ORDER,
    key=lambda k: (
      list(CONFIGS).index(k[0]),
      k[2] != FIRST[CONFIGS[k[0]][1]],
      k[2],
      TARGETS.index(k[1]),
    ),
  ):
    path = _file(out, config, target, dtype)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      p = json.load(f)
    dt = {'default': 'default', 'bf16teacher': 'bf16 teacher, XLA attn', 'bfloat16': 'all bf16',
          'float32': 'all f32', 'bf16teacher_flash': 'default: bf16 teacher, flash',
          'bfloat16_flash': 'all bf16, flash', 'float32_flash': 'all f32, flash'}[dtype]  # fmt: skip
    if 'error' in p:
      need = p['error'].split(': ', 2)[-1].split(';')[0]
      rows.append(f'| {config} | {dt} | {target} | no: {need} | | | | | | | | |')
      continue
    gib = p['hbm_bytes_per_chip'] / 2**30
    cap = p['hbm_capacity_bytes'] / 2**30
    epochs = p['total_steps'] // p['steps_per_epoch']
    rows.append(
      f'| {config} | {dt} | {target} | yes | {gib:.1f} of {cap:.1f} | '
      f'{p["roofline_step_seconds"] * 1000:.0f} ms{SMALL if p["per_chip_batch"] < 64 else ""} | '
      f'{p["images_per_second"]:,.0f} | '
      f'{_short(p["epoch_seconds"])} | {_short(p["schedule_seconds"])} ({epochs} ep) | '
      f'{p["flops_per_byte"]:.0f}{"" if _current(p) else "*"} ({p["ridge"]:.0f}) | '
      f'{100 * p["mfu_bound"]:.0f}% | '
      f'{p["largest_per_chip_batch_estimate"]} |'
    )
  return '\n'.join(rows)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'tpu'))
  ap.add_argument('--table', action='store_true', help='print the markdown table and exit')
  ap.add_argument('--only', nargs='*', help='config names to plan (default: all)')
  ap.add_argument('--compute', nargs='*', help='compute settings to plan (default: all)')
  ap.add_argument('--targets', nargs='*', help=f'slices to plan for (default: all of {TARGETS})')
  a = ap.parse_args()
  if a.table:
    print(table(a.out))
    return
  os.makedirs(a.out, exist_ok=True)
  for config, target, dtype in ORDER:
    if (
      (a.only and config not in a.only)
      or (a.compute and dtype not in a.compute)
      or (a.targets and target not in a.targets)
    ):
      continue
    path = _file(a.out, config, target, dtype)
    if os.path.exists(path):
      with open(path) as f:
        if _current(json.load(f)):
          continue
    run_one(a.out, config, target, dtype)


if __name__ == '__main__':
  main()
