r"""MOMA distillation-step benchmark: JAX (the trainer's own jitted step) vs the same step in PyTorch.

The JAX step is ``moma_jax.train.jit_train_step`` on ``objectives.moma.Moma`` (one teacher,
student_view 'masked'), built exactly as the trainer builds it (``create_state``, donation,
NamedSharding over all local devices). The PyTorch step (``benchmarks/torch_moma.py``) does the
same work in plain torch with ``scaled_dot_product_attention``, eagerly and under
``torch.compile``. All frameworks run in this one process, alternating round by round (the order
rotates every round), on device-resident synthetic uint8 images, so they see the same machine state.
Reported per setting: images/s (median over rounds, with min-max), step time, memory, model FLOP/s
and MFU (analytic FLOPs, ``Moma.flops_per_example``, over the device's peak), and the JAX / PyTorch
throughput ratio computed round by round (median, min-max).

  # CPU, float32 (the README table; ~25 min on 2 cores):
  python benchmarks/distill_step.py --suite cpu --out benchmarks/results/cpu
  # GPU (H100 / H200), bf16 compute with f32 master weights, cuDNN attention:
  python benchmarks/distill_step.py --suite gpu --out benchmarks/results/gpu
  # one setting:
  python benchmarks/distill_step.py --pairs L-B --batch 256 --mask 0.9 --frameworks jax torch

Memory: JAX's is XLA's compiled buffer assignment for the step (arguments + temporaries + outputs
not aliased to donated inputs), available on every backend; PyTorch's is
``torch.cuda.max_memory_allocated`` (GPU only). ``--e2e`` adds the JAX step fed by the real input
pipeline (JPEG decoding and the MOMA views from an image folder), to show whether it keeps up.
"""

from __future__ import annotations

import os

# Two frameworks share one GPU: JAX must not grab 75% of its memory at start-up.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moma_jax import hardware, optim, sharding, train  # noqa: E402
from moma_jax.data import device  # noqa: E402
from moma_jax.models.vit import ViT, decode_variant  # noqa: E402
from moma_jax.objectives.moma import Moma, Teacher  # noqa: E402

PAIRS = {  # teacher -> student, REFERENCE section 5
  'B-B': ('B/16', 'B/16'),
  'L-B': ('L/16', 'B/16'),
  'B-S': ('B/16', 'S/16'),
  'L-S': ('L/16', 'S/16'),
}
FRAMEWORKS = ('jax', 'torch', 'torch.compile')
SUITES = {
  # The comparison table, then scaling sweeps of the JAX and eager-PyTorch steps.
  'cpu': dict(
    table=dict(pairs=['B-B', 'B-S'], batch=[8], mask=[0.9], frameworks=list(FRAMEWORKS)),
    batch_sweep=dict(pair='B-B', batch=[1, 2, 4, 8, 16], mask=0.9),
    mask_sweep=dict(pair='B-B', batch=8, mask=[0.75, 0.8, 0.85, 0.9, 0.95]),
    steps=3,
    rounds=3,
  ),
  'gpu': dict(
    table=dict(pairs=list(PAIRS), batch=[256], mask=[0.9], frameworks=list(FRAMEWORKS)),
    batch_sweep=dict(pair='B-B', batch=[32, 64, 128, 256, 512, 1024], mask=0.9),
    mask_sweep=dict(pair='B-B', batch=256, mask=[0.75, 0.8, 0.85, 0.9, 0.95]),
    steps=20,
    rounds=5,
  ),
}


class JaxStep:
  """The trainer's jitted MOMA step on a fixed device-resident batch."""

  def __init__(self, pair, batch, mask_ratio, dtype, attention, image_size=224, seed=0):
    self.objective = moma_objective(pair, mask_ratio, dtype, attention, image_size)
    teacher = self.objective.teachers['t'].model
    mesh = sharding.make_mesh({'data': -1})
    lr = 1e-4  # constant: the schedule does not change the cost of a step
    tx = optim.adamw(lr, b2=0.999, weight_decay=0.05, frozen=self.objective.frozen_pattern)
    k_init, k_teacher, k_data, self.rng = jax.random.split(jax.random.key(seed), 4)
    self.state, state_sh, _ = train.create_state(self.objective, tx, mesh, [], k_init)
    repl = sharding.replicated(mesh)
    zeros = jnp.zeros((1, image_size, image_size, 3))
    self.frozen = {'t': jax.jit(teacher.init, out_shardings=repl)(k_teacher, zeros)}
    batch_sh = device.batch_sharding(mesh, sharding.data_axes(mesh))
    images = jax.random.randint(k_data, (batch, image_size, image_size, 3), 0, 256, jnp.int32)
    self.batch = {'teacher': jax.device_put(images.astype(jnp.uint8), batch_sh)}
    step = train.jit_train_step(
      self.objective, tx, lambda _: lr, mesh, state_sh, jax.tree.map(lambda _: repl, self.frozen)
    )
    self.compiled = step.lower(self.state, self.frozen, self.batch, self.rng).compile()
    mem = self.compiled.memory_analysis()
    self.memory = None
    if mem is not None:
      self.memory = (
        mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
      )  # fmt: skip

  def run(self, steps: int, batch=None) -> None:
    metrics = None
    for _ in range(steps):
      self.state, metrics = self.compiled(self.state, self.frozen, batch or self.batch, self.rng)
    jax.block_until_ready(metrics['loss'])


class TorchStep:
  """benchmarks/torch_moma.py's step, eager or compiled, on a fixed device-resident batch."""

  def __init__(self, pair, batch, mask_ratio, compile, amp, image_size=224, seed=0):
    import torch
    import torch_moma

    self.torch = torch
    torch.manual_seed(seed)
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    self.cuda = dev == 'cuda'
    tv, sv = PAIRS[pair]

    def arch(variant):
      return {**decode_variant(variant).kwargs(), 'image_size': image_size}

    if self.cuda:
      torch.cuda.reset_peak_memory_stats()
    self.step = torch_moma.MomaStep(
      arch(sv), arch(tv), mask_ratio, dev, torch.bfloat16 if amp else None, compile
    )
    self.images = torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8)
    self.images = self.images.to(dev)
    self.memory = None

  def run(self, steps: int) -> None:
    loss = None
    for _ in range(steps):
      loss = self.step(self.images)
    loss.item()  # synchronises the device
    if self.cuda:
      self.memory = self.torch.cuda.max_memory_allocated()


def make(framework, pair, batch, mask, args):
  if framework == 'jax':
    dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
    return JaxStep(pair, batch, mask, dtype, args.attention)
  return TorchStep(pair, batch, mask, framework == 'torch.compile', args.dtype == 'bfloat16')


def benchmark(frameworks, pair, batch, mask, args) -> dict:
  """Times every framework on one setting, alternating rounds; returns the result row."""
  runners = {}
  for fw in frameworks:
    t0 = time.perf_counter()
    runners[fw] = make(fw, pair, batch, mask, args)
    runners[fw].run(args.warmup)  # compilation, autotuning, allocator warm-up
    print(
      f'  {fw}: built + {args.warmup} warm-up steps in {time.perf_counter() - t0:.0f}s', flush=True
    )
  rates = {fw: [] for fw in frameworks}
  for r in range(args.rounds):
    order = frameworks[r % len(frameworks) :] + frameworks[: r % len(frameworks)]
    for fw in order:
      t0 = time.perf_counter()
      runners[fw].run(args.steps)
      rates[fw].append(batch * args.steps / (time.perf_counter() - t0))
  fpe = moma_objective(pair, mask).flops_per_example()
  row = {'pair': pair, 'batch': batch, 'mask': mask, 'results': {}}
  peak = hardware.peak_flops(jax.devices()[0].device_kind)
  for fw in frameworks:
    ips = statistics.median(rates[fw])
    row['results'][fw] = {
      'images_per_s': ips, 'min': min(rates[fw]), 'max': max(rates[fw]),
      'step_ms': 1000 * batch / ips, 'memory_bytes': runners[fw].memory,
      'tflops': ips * fpe / 1e12,
      'mfu': ips * fpe / peak if peak else None,
      'rounds': rates[fw],
    }  # fmt: skip
  if 'jax' in rates:
    for fw in frameworks:
      if fw != 'jax':
        ratios = [j / t for j, t in zip(rates['jax'], rates[fw], strict=True)]
        row['results'][fw]['jax_ratio'] = {
          'median': statistics.median(ratios), 'min': min(ratios), 'max': max(ratios)
        }  # fmt: skip
  del runners
  return row


def moma_objective(pair, mask_ratio, dtype=jnp.float32, attention=None, image_size=224) -> Moma:
  """The benchmarked objective: one teacher, the student matched on the masked view."""
  tv, sv = PAIRS[pair]

  def vit(variant):
    return ViT(
      **decode_variant(variant).kwargs(), image_size=image_size, dtype=dtype,
      attention_impl=attention,
    )  # fmt: skip

  return Moma(student=vit(sv), teachers={'t': Teacher(vit(tv))}, mask_ratio=mask_ratio)


def end_to_end(pair, batch, mask, args, seconds=30.0) -> dict:
  """JAX step fed by the real pipeline (JPEG folder -> MOMA teacher view -> prefetch to device)."""
  from benchmarks.input_pipeline import write_jpegs
  from moma_jax.data import pipeline, sources
  from moma_jax.data.augment import ViewSpec

  runner = make('jax', pair, batch, mask, args)
  runner.run(args.warmup)
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, max(256, 2 * batch))
    src = sources.open_split(f'folder:{root}', 'train', process_index=0, process_count=1)
    it = pipeline.train_iterator(src, {'teacher': ViewSpec(size=224)}, batch_size=batch, seed=0)
    mesh = runner.state.step.sharding.mesh
    batches = device.prefetch_to_device(
      ({'teacher': b['teacher']} for b in it), device.batch_sharding(mesh, sharding.data_axes(mesh))
    )
    runner.run(1, next(batches))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      runner.run(1, next(batches))
      n += batch
    ips = n / (time.perf_counter() - t0)
  return {'pair': pair, 'batch': batch, 'mask': mask, 'images_per_s': ips}


# --- reporting -------------------------------------------------------------------------------------


def fmt_mem(b):
  return '-' if b is None else f'{b / 2**30:.2f}'


def table(rows) -> str:
  lines = [
    '| teacher -> student | batch | mask | framework | images/s (min-max) | step ms | TFLOP/s | MFU '
    '| memory GiB | JAX / this (min-max) |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for row in rows:
    for fw, r in row['results'].items():
      ratio = r.get('jax_ratio')
      ratio_s = f'{ratio["median"]:.2f}x ({ratio["min"]:.2f}-{ratio["max"]:.2f})' if ratio else '-'
      mfu = f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else '-'
      lines.append(
        f'| {row["pair"].replace("-", " -> ")} | {row["batch"]} | {row["mask"]:.2f} | {fw} '
        f'| {r["images_per_s"]:.1f} ({r["min"]:.1f}-{r["max"]:.1f}) | {r["step_ms"]:.0f} '
        f'| {r["tflops"]:.3f} | {mfu} | {fmt_mem(r["memory_bytes"])} | {ratio_s} |'
      )
  return '\n'.join(lines)


def plot(sweeps: dict, out: str) -> list[str]:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  paths = []
  specs = [
    ('batch_sweep', 'batch', 'step time (s)', lambda r: r['step_ms'] / 1000, 'step_vs_batch.png'),
    ('mask_sweep', 'mask', 'step time (s)', lambda r: r['step_ms'] / 1000, 'step_vs_mask.png'),
    ('batch_sweep', 'batch', 'memory (GiB)', lambda r: (r['memory_bytes'] or np.nan) / 2**30,
     'memory_vs_batch.png'),
  ]  # fmt: skip
  for key, x_key, ylabel, value, fname in specs:
    rows = sweeps.get(key)
    if not rows:
      continue
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for fw in rows[0]['results']:
      xs = [r[x_key] for r in rows]
      ax.plot(xs, [value(r['results'][fw]) for r in rows], 'o-', label=fw)
    ax.set_xlabel('global batch' if x_key == 'batch' else 'mask ratio')
    ax.set_ylabel(ylabel)
    ax.set_title(f'{rows[0]["pair"].replace("-", " -> ")}, {jax.devices()[0].device_kind}')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, fname)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def gemm_gflops(m=1576, k=768, n=3072, reps=20) -> dict[str, float]:
  """float32 GEMM rate of each framework's matmul library on this machine (a ViT-B MLP matmul at
  batch 8), the ceiling that explains most of any CPU difference between the steps."""
  import torch

  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  mm = jax.jit(jnp.matmul)
  mm(ja, jb).block_until_ready()
  (ta @ tb).sum().item()
  out = {}
  for name, fn in (
    ('jax', lambda: mm(ja, jb).block_until_ready()),
    ('torch', lambda: (ta @ tb)[0, 0].item()),
  ):
    t0 = time.perf_counter()
    for _ in range(reps):
      fn()
    out[name] = 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9
  return out


def environment(args) -> dict:
  import torch

  return {
    'device': jax.devices()[0].device_kind,
    'devices': jax.device_count(),
    'cpu': platform.processor() or platform.machine(),
    'cores': os.cpu_count(),
    'torch_threads': torch.get_num_threads(),
    'jax': jax.__version__,
    'torch': torch.__version__,
    'python': platform.python_version(),
    'dtype': args.dtype,
    'attention': args.attention,
    'steps_per_round': args.steps,
    'rounds': args.rounds,
    'command': ' '.join(['python', *sys.argv]),
    'gemm_f32_gflops': gemm_gflops(),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--suite', choices=sorted(SUITES), help='a predefined table + scaling sweeps')
  p.add_argument('--pairs', nargs='+', choices=list(PAIRS), default=['B-B'])
  p.add_argument('--batch', type=int, nargs='+', default=[8])
  p.add_argument('--mask', type=float, nargs='+', default=[0.9])
  p.add_argument('--frameworks', nargs='+', choices=FRAMEWORKS, default=list(FRAMEWORKS))
  p.add_argument('--steps', type=int, default=None, help='timed steps per round')
  p.add_argument('--rounds', type=int, default=None)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--dtype', choices=['float32', 'bfloat16'], default=None,
                 help='compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)')  # fmt: skip
  p.add_argument('--attention', choices=['xla', 'cudnn'], default=None,
                 help='jax.nn.dot_product_attention implementation (default: cudnn on GPU)')  # fmt: skip
  p.add_argument('--e2e', action='store_true', help='also time the step fed by the input pipeline')
  p.add_argument('--out', default=None, help='directory for results.json, table.md and PNG plots')
  args = p.parse_args()

  platform_name = jax.devices()[0].platform
  if args.dtype is None:
    args.dtype = 'float32' if platform_name == 'cpu' else 'bfloat16'
  if args.attention is None and platform_name == 'gpu':
    args.attention = 'cudnn'
  suite = SUITES.get(args.suite)
  if suite:
    args.steps = args.steps or suite['steps']
    args.rounds = args.rounds or suite['rounds']
    tbl = suite['table']
  else:
    args.steps, args.rounds = args.steps or 3, args.rounds or 3
    tbl = dict(pairs=args.pairs, batch=args.batch, mask=args.mask, frameworks=args.frameworks)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
  env = environment(args)
  print(json.dumps(env), flush=True)

  results = {'environment': env, 'table': [], 'sweeps': {}, 'end_to_end': []}

  def save():
    if args.out:
      with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)

  for pair in tbl['pairs']:
    for batch in tbl['batch']:
      for mask in tbl['mask']:
        print(f'{pair} batch {batch} mask {mask}', flush=True)
        results['table'].append(benchmark(list(tbl['frameworks']), pair, batch, mask, args))
        print(table(results['table'][-1:]), flush=True)
        save()
  if suite:
    fws = ['jax', 'torch']
    bs = suite['batch_sweep']
    results['sweeps']['batch_sweep'] = []
    for batch in bs['batch']:
      print(f'batch sweep: {bs["pair"]} batch {batch}', flush=True)
      results['sweeps']['batch_sweep'].append(benchmark(fws, bs['pair'], batch, bs['mask'], args))
      save()
    ms = suite['mask_sweep']
    results['sweeps']['mask_sweep'] = []
    for mask in ms['mask']:
      print(f'mask sweep: {ms["pair"]} mask {mask}', flush=True)
      results['sweeps']['mask_sweep'].append(benchmark(fws, ms['pair'], ms['batch'], mask, args))
      save()
  if args.e2e:
    for pair in tbl['pairs']:
      results['end_to_end'].append(end_to_end(pair, tbl['batch'][0], tbl['mask'][0], args))
      print('end to end:', results['end_to_end'][-1], flush=True)
      save()

  text = table(results['table'])
  for key, rows in results['sweeps'].items():
    text += f'\n\n{key}:\n\n' + table(rows)
  for r in results['end_to_end']:
    text += f'\n\nend to end (input pipeline): {r["pair"]} batch {r["batch"]}: {r["images_per_s"]:.1f} images/s'
  print(text)
  if args.out:
    with open(os.path.join(args.out, 'table.md'), 'w') as f:
      f.write(text + '\n')
    for path in plot(results['sweeps'], args.out):
      print('wrote', path)


if __name__ == '__main__':
  main()
