r"""Step time of the multi-crop objectives: DINO ViT-S/16, DINO ResNet-50 and the MOKD pair
(ResNet-50 + ViT-S/16), at their full recipes' shapes (2 x 224 px + 8 x 96 px crops, 65536
prototypes, the objectives' own optimizers), with the trainer's jitted, donated step.

  # CPU, float32 (the README rows; ~10 min on 2 cores):
  python benchmarks/multicrop_step.py --batch 4 --out benchmarks/results/cpu
  # GPU (bf16 compute, f32 parameters):
  python benchmarks/multicrop_step.py --batch 64 --dtype bfloat16 --out benchmarks/results/gpu

Reported per model: images/s (median over timed steps, min-max), step ms, analytic model FLOP/s
(``flops_per_example``: student forward + backward on every crop, teacher forward on the global
crops; heads left out) and XLA's compiled memory for the step. Compare with the MOMA distillation
step of ``benchmarks/distill_step.py`` (same machine, same float32; its table is
``benchmarks/results/<suite>/table.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import dino_pretrain, mokd  # noqa: E402
from moma_jax import hardware, sharding, train  # noqa: E402
from moma_jax.data import device  # noqa: E402
from moma_jax.objectives import dino as dino_lib  # noqa: E402
from moma_jax.objectives import registry  # noqa: E402

MODELS = ('dino_vit_s', 'dino_resnet50', 'mokd_r50_vit_s')


def _config(name: str, batch: int, dtype: str):
  if name == 'mokd_r50_vit_s':
    c = mokd.get_config()
    c.cnn.dtype = c.vit.dtype = dtype
  else:
    c = dino_pretrain.get_config('arch=' + ('S/16' if name == 'dino_vit_s' else 'resnet50'))
    c.model.dtype = dtype
  c.batch_size = batch
  return c


def _objective(c, total_steps: int):
  """The builder's objective, without opening the dataset (100 steps per epoch given)."""
  return registry.build_objective(c, 0, total_steps, steps_per_epoch=100)[0]


def measure(name: str, batch: int, steps: int, dtype: str) -> dict:
  c = _config(name, batch, dtype)
  objective = _objective(c, 1000)
  mesh = sharding.make_mesh({'data': -1})
  tx, schedule, _ = objective.make_optimizer(c, 1000, 100)
  state, ssh, _ = train.create_state(objective, tx, mesh, [('.*', 'fsdp')], jax.random.key(0))
  step = train.jit_train_step(objective, tx, schedule, mesh, ssh, sharding.replicated(mesh))
  g_names, l_names = dino_lib.view_names(objective.num_local)
  rng = np.random.RandomState(0)
  local = {
    **{v: rng.randint(0, 256, (batch, objective.global_size, objective.global_size, 3)) for v in g_names},
    **{v: rng.randint(0, 256, (batch, objective.local_size, objective.local_size, 3)) for v in l_names},
  }  # fmt: skip
  local = {k: v.astype(np.uint8) for k, v in local.items()}
  bsh = device.batch_sharding(mesh, sharding.data_axes(mesh))
  data = device.make_global(local, bsh)
  t0 = time.perf_counter()
  lowered = step.lower(state, {}, data, jax.random.key(1))
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  mem_gib = None
  if mem is not None:
    mem_gib = (
      mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
      - mem.alias_size_in_bytes
    ) / 2**30  # fmt: skip
  state, m = compiled(state, {}, data, jax.random.key(1))  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, {}, data, jax.random.key(1))
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  med = statistics.median(times)
  fl = objective.flops_per_example() * batch
  peak = hardware.peak_flops(jax.devices()[0].device_kind)
  return {
    'model': name,
    'batch': batch,
    'crops': f'2x{objective.global_size} + {objective.num_local}x{objective.local_size}',
    'images_per_sec': batch / med,
    'images_per_sec_min_max': (batch / max(times), batch / min(times)),
    'step_ms': 1000 * med,
    'tflops': fl / med / 1e12,
    'mfu': fl / med / (peak * jax.device_count()) if peak else None,
    'gflop_per_image': objective.flops_per_example() / 1e9,
    'memory_gib': mem_gib,
    'compile_s': compile_s,
    'loss': float(m['loss']),
  }


def table(rows: list[dict]) -> str:
  out = [
    '| model | batch | crops | images/s (min-max) | step ms | GFLOP / image | TFLOP/s | MFU | memory GiB |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    lo, hi = r['images_per_sec_min_max']
    mfu = f'{100 * r["mfu"]:.1f}%' if r['mfu'] else '-'
    mem = f'{r["memory_gib"]:.2f}' if r['memory_gib'] is not None else '-'
    out.append(
      f'| {r["model"]} | {r["batch"]} | {r["crops"]} | {r["images_per_sec"]:.2f} '
      f'({lo:.2f}-{hi:.2f}) | {r["step_ms"]:.0f} | {r["gflop_per_image"]:.1f} | '
      f'{r["tflops"]:.3f} | {mfu} | {mem} |'
    )
  return '\n'.join(out) + '\n'


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', nargs='+', default=list(MODELS), choices=MODELS)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--steps', type=int, default=3, help='timed steps (after one warm-up step)')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--out', help='directory for multicrop.json / multicrop.md')
  args = p.parse_args(argv)
  rows = []
  for name in args.models:
    rows.append(measure(name, args.batch, args.steps, args.dtype))
    print(table(rows[-1:]).splitlines()[-1], flush=True)
  text = table(rows)
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    env = {
      'device': jax.devices()[0].device_kind, 'devices': jax.device_count(),
      'jax': jax.__version__, 'python': platform.python_version(), 'dtype': args.dtype,
    }  # fmt: skip
    with open(os.path.join(args.out, 'multicrop.json'), 'w') as f:
      json.dump({'env': env, 'rows': rows}, f, indent=1)
    with open(os.path.join(args.out, 'multicrop.md'), 'w') as f:
      f.write(text)
  return 0


if __name__ == '__main__':
  jnp.zeros(())  # initialise the backend before timing anything
  sys.exit(main())
