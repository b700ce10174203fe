"""Plan a run before renting the hardware: compile the real train step for a TPU slice that is not
here, and say whether it fits, how fast it can go and how long the schedule takes.

  python main.py --config=configs/moco_to_mae.py --plan=v5litepod-8 [--plan_json=PATH]

The step is built by the trainer's own set-up (``train.build_setup``, ``train.state_layout``,
``Setup.train_step``) over compile-only devices of libtpu's topology description
(``jax.experimental.topologies.get_topology_desc``, as MaxText's train_compile.py), with every
array abstract: checkpoints are read for their shapes only, no data is read, nothing is
allocated. XLA's compile for the target gives the per-chip memory (``memory_analysis``) and
FLOPs (``cost_analysis``); the compiled HLO, after memory-space assignment, gives the bytes the
step moves in HBM (``hbm_traffic``); a step that does not fit raises RESOURCE_EXHAUSTED there, as
it would on the pod.

The speed is a roofline from the compiler's cost model, not a clock: a step takes at least
max(FLOPs / peak bf16 FLOP/s, HBM bytes / HBM bandwidth) per chip, which bounds the MFU (the
formula's model FLOPs over the chips' peak in that time). Collectives, the input pipeline and
imperfect overlap only make a real step slower.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from moma_jax import builders, hardware, storage, train
from moma_jax.data import pipeline, sources
from moma_jax.hardware import GiB


class DoesNotFit(RuntimeError):
  """The step needs more memory per chip than the target has (one line: by how much, and what
  change makes it fit)."""


def split_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(train examples, classes) of the config's train split: the tfds catalogue's figures
  (sources.KNOWN_SPLITS), else the split's metadata (embedded data, an image folder, a prepared
  tfds dataset); no example is read."""
  d = config.data
  if (d.name, d.train_split) in sources.KNOWN_SPLITS:
    return sources.KNOWN_SPLITS[(d.name, d.train_split)]
  try:
    src = sources.open_split(  # no manual_dir: never prepares a dataset
      d.name, d.train_split, data_dir=d.data_dir, process_index=0, process_count=1
    )
  except sources.DataError as e:
    raise ValueError(
      f'{e}; a plan reads no data: give --config.num_train_steps (and the classes do not matter)'
    ) from None
  return src.total_examples, src.num_classes


def target_devices(target: hardware.Target | None) -> list[Any]:
  """Compile-only devices of ``target`` (None: this machine's own devices)."""
  if target is None:
    return jax.devices()
  from jax.experimental import topologies

  kwargs = {'chip_config_name': 'megacore'} if target.chip.megacore else {}
  topo = topologies.get_topology_desc(
    topology_name=target.topology,
    platform='tpu',
    chips_per_host_bounds=target.chips_per_host,
    num_slices=target.num_slices,
    **kwargs,
  )
  return list(topo.devices)


def _shaped(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def _bytes_per_chip(tree: Any) -> int:
  """Bytes of one chip's shards of ShapeDtypeStructs that carry their shardings."""
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree)
    if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  )


_DTYPE_BYTES = {
  'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4,
  'u32': 4, 'f64': 8, 's64': 8, 'u64': 8,
}  # fmt: skip
# One array of an HLO shape with its layout: 'f32[192,3072]{1,0:T(8,128)S(1)}'. S(n), n > 0, is
# a memory space on the chip (TPU: 1 VMEM, 2 and 6 scalar memories), not HBM.
_LEAF = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([\d,]*)\](\{[^}]*\})?')
_ON_CHIP = re.compile(r'S\([1-9]\d*\)')
_INSTRUCTION = re.compile(r'\s+(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*)$')
_FREE = {
  'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'after-all', 'partition-id',
  'replica-id',
}  # fmt: skip
_CALLS = {'while', 'call', 'conditional'}  # their bodies are other computations: not counted


def _leaves(shape: str) -> list[tuple[int, bool]]:
  """(bytes, lives in HBM) for each array of an HLO shape."""
  return [
    (_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(',') if d),
     not _ON_CHIP.search(layout or ''))
    for dt, dims, layout in _LEAF.findall(shape)
  ]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Traffic:
  """What one step of a compiled program reads and writes in HBM, from its HLO."""

  hbm_bytes: float | None  # None: the entry runs other computations (loops) this does not count
  by_source: list[tuple[str, float]]  # (JAX source, share of the HBM bytes), largest first


def hbm_traffic(hlo: str, top: int = 8, depth: int = 4) -> Traffic:
  """The HBM bytes a compiled program moves per step, and which JAX sources move them.

  Each instruction of the entry computation (a fusion is one instruction: its insides stay on
  chip) counts its operands and its result, as XLA's cost analysis does, but only the arrays that
  live in HBM. Written by hand because XLA's 'bytes accessed' sums every memory space: after a
  TPU compile's memory-space assignment much of a step's data sits in VMEM (S(1) in the layout),
  prefetched there by async slices and copies, and XLA counts the prefetch's read, its write to
  VMEM and every read of it from VMEM, all at HBM's bandwidth in a roofline (a B/16 -> B/16 MOMA
  step on v5e-8: 161.5 GB accessed, 81 GB of it HBM). A prefetch moves its slice out of HBM
  once; an operand already in VMEM costs HBM nothing. A fusion is taken to read each HBM operand
  once (as XLA's count does), and a Pallas kernel's operands once each.

  Sources are the op_name metadata with the block index folded (blocks_*), 'jit(step)' and
  autodiff wrappers dropped, cut at ``depth`` levels ('teacher_moco/ViT/blocks_*')."""
  entry = hlo[hlo.index('\nENTRY ') :]
  entry = entry[: entry.find('\n}') + 1]
  shapes: dict[str, list[tuple[int, bool]]] = {}
  totals: dict[str, float] = {}
  complete = True
  for line in entry.splitlines()[1:]:
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    shapes[name] = result = _leaves(shape)
    complete &= op not in _CALLS
    if op in _FREE or op in _CALLS or op.endswith('-done'):  # an async op's start moved it
      continue
    operands = [shapes.get(o, []) for o in re.findall(r'%([\w.\-]+)', rest.split(')', 1)[0])]
    if op in ('slice-start', 'copy-start'):  # ((source), destination, context): one transfer
      moved, to_hbm = result[-2] if op == 'slice-start' else result[1]
      from_hbm = bool(operands and operands[0] and operands[0][0][1])
      hbm = moved * (from_hbm + to_hbm)
    else:
      hbm = sum(b for b, in_hbm in result + [x for o in operands for x in o] if in_hbm)
    src = re.search(r'op_name="([^"]*)"', rest)
    key = src.group(1).split(';')[0] if src else f'(no JAX source: {op})'
    key = re.sub(r'blocks_\d+', 'blocks_*', re.sub(r'^jit\([^)]*\)/', '', key))
    while True:  # transforms' wrappers: jvp(ViT) -> ViT, transpose(jvp(ViT)) -> ViT
      unwrapped = re.sub(r'\b(?:jvp|transpose|vmap|jit|checkpoint|remat)\(([^()]*)\)', r'\1', key)
      if unwrapped == key:
        break
      key = unwrapped
    key = '/'.join(p for p in key.split('/')[:depth] if p)
    totals[key] = totals.get(key, 0.0) + hbm
  whole = sum(totals.values())
  ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
  return Traffic(
    hbm_bytes=whole if complete else None,
    by_source=[(k, v / (whole or 1.0)) for k, v in ranked],
  )


def _models(objective: Any) -> list[str]:
  """'name: variant dtype [remat]' for every model module of the objective (its dataclass fields
  and its teachers), for the table."""
  from flax import linen as nn

  from moma_jax.models import resnet, vit

  out = []

  def describe(name: str, m: Any) -> None:
    if isinstance(m, vit.ViT):
      v = (
        vit.name_variant(m.width, m.depth, m.num_heads, m.patch_size) or f'ViT {m.width}x{m.depth}'
      )
      remat = f', remat {m.remat}' if getattr(m, 'remat', 'none') != 'none' else ''
      scan = ', scanned' if getattr(m, 'scan_blocks', False) else ''
      flash = ', flash attention' if m.attention_impl == 'flash' else ''
      out.append(f'{name} {v} {jax.numpy.dtype(m.dtype).name}{remat}{scan}{flash}')
    elif isinstance(m, resnet.ResNet):
      v = resnet.name_variant(m.block, m.stage_sizes, m.width, m.small_stem) or 'ResNet'
      out.append(f'{name} {v} {jax.numpy.dtype(m.dtype).name}')

  for f in dataclasses.fields(objective):
    value = getattr(objective, f.name)
    if isinstance(value, nn.Module):
      describe(f.name, value)
  for t_name, t in objective.eval_teachers().items():
    describe(f'teacher {t_name}', t.model)
  return out


_OOM = re.compile(r'([\d.]+)([KMGT])i?B?\b.*?(?:exceeds|of)\D*([\d.]+)([KMGT])', re.S)
_UNITS = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def _oom_bytes(message: str) -> tuple[float, float] | None:
  """(needed, available) bytes from XLA's RESOURCE_EXHAUSTED message, when it says them."""
  m = _OOM.search(message)
  if not m:
    return None
  return float(m.group(1)) * _UNITS[m.group(2)], float(m.group(3)) * _UNITS[m.group(4)]


def _pow2_floor(x: float) -> int:
  return 2 ** int(math.floor(math.log2(x))) if x >= 1 else 0


def _fixes(config: ml_collections.ConfigDict, fit_batch: int | None, chips: int) -> list[str]:
  """Config changes that lower the memory per chip, those that apply to this config."""
  out = []
  if fit_batch and fit_batch < config.batch_size:
    out.append(f'--config.batch_size={fit_batch} (estimated to fit)')
  for key, value in (
    ('student.remat', 'block'), ('teacher_dtype', 'bfloat16'), ('student.dtype', 'bfloat16'),
    ('model.dtype', 'bfloat16'), ('classifier.dtype', 'bfloat16'),
  ):  # fmt: skip
    node, *rest = key.split('.')
    cur = config.get(node)
    if rest and isinstance(cur, ml_collections.ConfigDict):
      cur = cur.get(rest[0])
    if cur is not None and cur != value and not isinstance(cur, ml_collections.ConfigDict):
      out.append(f'--config.{key}={value}')
  if config.mesh.get('fsdp', 1) == 1 and chips > 1:
    out.append('--config.mesh.data=1 --config.mesh.fsdp=-1 (FSDP: parameters split over chips)')
  return out


def _refusal(config, where: str, per_chip: int, over: str, fit: int | None, chips: int):
  """The one-line DoesNotFit: what is over, and the config changes that lower the memory."""
  return DoesNotFit(
    f'the step does not fit on {where} at batch {config.batch_size} ({per_chip} per chip): '
    f'{over}; try {", or ".join(_fixes(config, fit, chips))}'
  )


def _largest_batch(per_chip: int, fixed: float, temp: float, capacity: float) -> int:
  """Per-chip batch that fits if the temporaries grow in proportion to the batch (an estimate:
  part of them, gradients and optimizer updates, does not grow); 0 when nothing fits."""
  if temp <= 0:
    return per_chip
  return max(0, int((capacity - fixed) / (temp / per_chip)))


def make_plan(config: ml_collections.ConfigDict, where: str) -> dict[str, Any]:
  """Compiles the configured train step for ``where`` ('local' or a TPU, see
  hardware.parse_target) and returns the plan's figures. Raises DoesNotFit when the step does
  not fit in a chip's memory, ValueError (one line) for a bad target or config."""
  target = None if where == 'local' else hardware.parse_target(where)
  devices = target_devices(target)
  chip = target.chip if target else hardware.chip_of(devices[0].device_kind)
  setup = train.build_setup(config, devices, lambda: split_size(config), builders.SHAPES)
  rng = jax.random.key(config.seed)
  abstract, state_sharding = train.state_layout(
    setup.objective, setup.tx, setup.mesh, config.sharding_rules, rng, setup.start_params
  )
  batch = {
    k: jax.ShapeDtypeStruct(shape, dtype, sharding=setup.batch_sharding())
    for k, (shape, dtype) in pipeline.batch_spec(
      setup.views, config.batch_size, setup.augment is not None
    ).items()
  }
  repl = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
  key = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=repl)
  args = (
    _shaped(abstract, state_sharding), _shaped(setup.frozen, setup.frozen_sharding(config)), batch,
    key,
  )  # fmt: skip
  chips = len(devices)
  hosts = len({d.process_index for d in devices})
  dp = int(np.prod([setup.mesh.shape[a] for a in setup.data_axes]))
  per_chip = config.batch_size // dp
  where_label = str(target) if target else f'local ({chips} x {devices[0].device_kind})'
  t0 = time.perf_counter()
  try:
    with jax.set_mesh(setup.mesh):  # as the run traces it (Pallas kernels read the mesh)
      compiled = setup.train_step(config, state_sharding).lower(*args).compile()
  except Exception as e:  # noqa: BLE001  (XlaRuntimeError; its type moves between jax versions)
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    found, fit = _oom_bytes(str(e)), None
    if found:
      need, have = found
      over = f'{need / GiB:.2f} GiB per chip needed, {have / GiB:.2f} GiB available'
      fit = _pow2_floor(per_chip * have / need) * dp  # activations dominate: about linear
    else:
      over = ' '.join(str(e).split())[:200]
    raise _refusal(config, where_label, per_chip, over, fit, chips) from None
  compile_s = time.perf_counter() - t0
  traffic = hbm_traffic(compiled.as_text())
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  args_b, temp_b = mem.argument_size_in_bytes, mem.temp_size_in_bytes
  out_b, alias_b, code_b = (
    mem.output_size_in_bytes,
    mem.alias_size_in_bytes,
    mem.generated_code_size_in_bytes,
  )
  hbm = args_b + temp_b + out_b - alias_b + code_b
  flops_chip = float(cost.get('flops', 0.0))
  bytes_chip = float(cost.get('bytes accessed', 0.0))  # every memory space (see hbm_traffic)
  # The roofline's bytes: HBM's only, or XLA's count where the HLO calls loops we do not count.
  traffic_chip = traffic.hbm_bytes if traffic.hbm_bytes else bytes_chip
  formula = setup.objective.flops_per_example() * config.batch_size
  plan: dict[str, Any] = {
    'config': config.name,
    'target': where_label,
    'topology': target.topology if target else 'local',
    'device_kind': devices[0].device_kind,
    'chips': chips,
    'hosts': hosts,
    'mesh': dict(setup.mesh.shape),
    'global_batch': config.batch_size,
    'per_chip_batch': per_chip,
    'per_host_batch': setup.per_host_batch,
    'models': _models(setup.objective),
    'photometric_on_device': setup.augment is not None,
    'total_steps': setup.total_steps,
    'steps_per_epoch': setup.steps_per_epoch,
    'flops_per_step': flops_chip * chips,
    'formula_flops_per_step': formula,
    'bytes_accessed_per_chip': bytes_chip,
    'hbm_traffic_per_chip': traffic_chip,
    'hbm_traffic_counted_from_hlo': bool(traffic.hbm_bytes),
    'hbm_bytes_per_chip': hbm,
    'hbm': {
      'arguments': args_b,
      'temporaries': temp_b,
      'outputs_not_donated': out_b - alias_b,
      'code': code_b,
    },
    # the arguments by kind: trained state (parameters + optimizer), frozen teachers, batch
    'state_bytes_per_chip': _bytes_per_chip(args[0]),
    'frozen_bytes_per_chip': _bytes_per_chip(args[1]),
    'batch_bytes_per_chip': _bytes_per_chip(args[2]),
    'hbm_traffic_by_source': traffic.by_source,
    'compile_seconds': compile_s,
  }
  if chip is None:  # a CPU: nothing to compare with
    plan.update(hbm_capacity_bytes=None, fits=None)
    return plan
  capacity = chip.hbm_bytes
  fixed = hbm - temp_b
  plan.update(
    chip=chip.name, hbm_capacity_bytes=capacity, fits=hbm <= capacity,
    largest_per_chip_batch_estimate=_largest_batch(per_chip, fixed, temp_b, capacity),
  )  # fmt: skip
  t_flops, t_bytes = flops_chip / chip.peak_bf16, traffic_chip / chip.hbm_bandwidth
  step_s = max(t_flops, t_bytes)
  plan.update(
    peak_bf16_flops=chip.peak_bf16, hbm_bandwidth=chip.hbm_bandwidth,
    flops_per_byte=flops_chip / traffic_chip if traffic_chip else math.inf, ridge=chip.ridge,
    flops_per_byte_all_memory=flops_chip / bytes_chip if bytes_chip else math.inf,
    bound='compute' if t_flops >= t_bytes else 'memory', roofline_step_seconds=step_s,
    images_per_second=config.batch_size / step_s if step_s else math.inf,
    epoch_seconds=setup.steps_per_epoch * step_s, schedule_seconds=setup.total_steps * step_s,
    mfu_bound=formula / chips / chip.peak_bf16 / step_s if step_s else 0.0,
  )  # fmt: skip
  if not plan['fits']:
    fit = _pow2_floor(plan['largest_per_chip_batch_estimate']) * dp
    over = (
      f'{hbm / GiB:.2f} GiB per chip needed, {capacity / GiB:.2f} GiB available '
      f'({(hbm - capacity) / GiB:.2f} GiB over)'
    )
    raise _refusal(config, where_label, per_chip, over, fit, chips)
  return plan


def _gib(x: float) -> str:
  return f'{x / GiB:.2f} GiB'


def _duration(seconds: float) -> str:
  if seconds >= 86400:
    return f'{seconds / 86400:.1f} d'
  if seconds >= 3600:
    return f'{seconds / 3600:.1f} h'
  if seconds >= 60:
    return f'{seconds / 60:.1f} min'
  return f'{seconds * 1000:.0f} ms' if seconds < 1 else f'{seconds:.1f} s'


def format_plan(p: dict[str, Any]) -> list[str]:
  """The plan as the table the command prints."""
  h = p['hbm']
  rows = [
    ('target', f'{p["target"]}: {p["chips"]} chips, {p["hosts"]} hosts, {p["device_kind"]}'),
    ('mesh', ', '.join(f'{k} {v}' for k, v in p['mesh'].items())),
    ('batch', f'{p["global_batch"]} global, {p["per_chip_batch"]} per chip, '
              f'{p["per_host_batch"]} per host'),
    ('models', '; '.join(p['models'])),
    ('HBM per chip', f'{_gib(p["hbm_bytes_per_chip"])}'
     + (f' of {_gib(p["hbm_capacity_bytes"])}: {"fits" if p["fits"] else "DOES NOT FIT"}'
        if p.get('hbm_capacity_bytes') else '')
     + f' (arguments {_gib(h["arguments"])}: state {_gib(p["state_bytes_per_chip"])}, frozen '
       f'{_gib(p["frozen_bytes_per_chip"])}, batch {_gib(p["batch_bytes_per_chip"])}; temporaries '
       f'{_gib(h["temporaries"])}, outputs {_gib(h["outputs_not_donated"])}, code '
       f'{_gib(h["code"])})'),
    ('FLOPs per step', f'{p["flops_per_step"] / 1e12:.1f} TFLOP (XLA), '
                       f'{p["formula_flops_per_step"] / 1e12:.1f} TFLOP (formula)'),
    ('bytes per chip', f'{p["hbm_traffic_per_chip"] / 1e9:.1f} GB of HBM traffic per step '
                       f'({p["bytes_accessed_per_chip"] / 1e9:.1f} GB accessed in all memory '
                       'spaces, XLA\'s count)'),
  ]  # fmt: skip
  if 'roofline_step_seconds' in p:
    rows += [
      ('roofline step', f'{_duration(p["roofline_step_seconds"])} ({p["bound"]}-bound: '
                        f'{p["flops_per_byte"]:.0f} FLOP/byte, ridge {p["ridge"]:.0f}), '
                        f'{p["images_per_second"]:,.0f} images/s'),
      ('epoch / schedule', f'{_duration(p["epoch_seconds"])} per epoch '
                           f'({p["steps_per_epoch"]} steps), {_duration(p["schedule_seconds"])} '
                           f'for {p["total_steps"]} steps'),
      ('MFU bound', f'{100 * p["mfu_bound"]:.0f}%'),
      ('largest batch', f'~{p["largest_per_chip_batch_estimate"]} per chip (estimate: '
                        'temporaries taken as proportional to the batch)'),
    ]  # fmt: skip
  if p.get('hbm_traffic_by_source'):
    rows.append(('HBM traffic', ', '.join(
      f'{src or "?"} {100 * share:.0f}%' for src, share in p['hbm_traffic_by_source'][:4]
    )))  # fmt: skip
  rows.append(('compile', f'{p["compile_seconds"]:.0f} s on this machine'))
  width = max(len(k) for k, _ in rows)
  return [f'{p["config"]} planned (compiled, nothing run):'] + [
    f'  {k:<{width}}  {v}' for k, v in rows
  ]


def write_json(plan: dict[str, Any], path: str) -> None:
  storage.write_text_atomic(storage.Path(path), json.dumps(plan, indent=1, default=str))
