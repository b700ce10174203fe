"""Accelerator chips: what each can hold and do (vendor figures, per chip), and Cloud TPU names.

One table for the MFU the trainer logs (``peak_flops``) and for the plan's roofline
(moma_jax/plan.py). TPU figures: Cloud TPU documentation (REFERENCE section 5); HBM is what XLA
lets a program use where it was measured (v5e: 15.75 GiB of 16), the vendor's capacity elsewhere.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import pkgutil
import re
import sys

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip (a TPU chip counts both TensorCores of a v4 / v5p megacore)."""

  name: str  # the libtpu topology prefix: v4, v5e, v5p, v6e
  device_kinds: tuple[str, ...]  # jax Device.device_kind strings of this chip
  hbm_bytes: int
  peak_bf16: float  # dense FLOP/s
  hbm_bandwidth: float  # bytes/s
  dims: int = 2  # torus dimensions of its topology names (v4 / v5p: 2x2x1)
  megacore: bool = False  # one JAX device per chip from two TensorCores (v4, v5p)
  cores_in_name: int = 1  # Cloud TPU accelerator names count TensorCores (v4-8 = 4 chips)
  pod_name: str = ''  # the accelerator-type prefix users type (v5litepod-8)
  min_chips: int = 1

  @property
  def ridge(self) -> float:
    """FLOPs per byte of HBM traffic above which a program is compute-bound."""
    return self.peak_bf16 / self.hbm_bandwidth


TPUS = {
  c.name: c
  for c in (
    Chip('v4', ('TPU v4',), 32 * GiB, 275e12, 1.2e12, dims=3, megacore=True, cores_in_name=2,
         pod_name='v4', min_chips=4),
    Chip('v5e', ('TPU v5 lite', 'TPU v5e'), int(15.75 * GiB), 197e12, 0.82e12, pod_name='v5litepod'),
    Chip('v5p', ('TPU v5', 'TPU v5p'), 95 * GiB, 459e12, 2.765e12, dims=3, megacore=True,
         cores_in_name=2, pod_name='v5p', min_chips=4),
    Chip('v6e', ('TPU v6 lite', 'TPU v6e'), 32 * GiB, 918e12, 1.64e12, pod_name='v6e'),
  )
}  # fmt: skip
GPUS = (
  Chip('H100', ('H100',), 80 * GiB, 989e12, 3.35e12),
  Chip('H200', ('H200',), 141 * GiB, 989e12, 4.8e12),
)


def chip_of(device_kind: str) -> Chip | None:
  """The chip of a jax ``device_kind`` ('TPU v5 lite', 'NVIDIA H100 80GB HBM3'), None if unknown.

  TPU kinds match exactly ('TPU v5' is a v5p, 'TPU v5 lite' a v5e); GPU kinds by model name."""
  for chip in TPUS.values():
    if device_kind in chip.device_kinds:
      return chip
  for chip in GPUS:
    if any(k.lower() in device_kind.lower() for k in chip.device_kinds):
      return chip
  return None


def peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of a device kind, or None when unknown (CPU): for MFU."""
  chip = chip_of(device_kind)
  return chip.peak_bf16 if chip else None


def torus(chip: Chip, chips: int) -> tuple[int, ...]:
  """The Cloud TPU slice shape of ``chips`` chips: v5e / v6e 2-D (8 -> 2x4, 256 -> 16x16), v4 /
  v5p 3-D (4 -> 2x2x1, 64 -> 4x4x4): from the smallest shape, the shortest side (the last of
  equal ones) doubles until the count is reached, as the Cloud TPU shapes grow."""
  if chips < chip.min_chips or chips & (chips - 1):
    raise ValueError(
      f'{chip.name}: {chips} chips is not a Cloud TPU slice; use a power of two >= {chip.min_chips}'
    )
  dims = [2, 2, 1] if chip.dims == 3 else [1, 1]
  while _prod(dims) < chips:
    smallest = min(dims)
    i = max(j for j, d in enumerate(dims) if d == smallest)
    dims[i] *= 2
  return tuple(dims)


def _prod(xs) -> int:
  out = 1
  for x in xs:
    out *= x
  return out


@dataclasses.dataclass(frozen=True)
class Target:
  """A TPU slice to plan for: ``chip`` x ``shape`` per slice, ``num_slices`` slices."""

  chip: Chip
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def topology(self) -> str:
    """libtpu's name: v5e:2x4, v5p:2x2x1."""
    return f'{self.chip.name}:{"x".join(map(str, self.shape))}'

  @property
  def chips(self) -> int:
    return _prod(self.shape) * self.num_slices

  @property
  def accelerator_type(self) -> str:
    """The Cloud TPU accelerator type of one slice (v5litepod-8, v4-8)."""
    return f'{self.chip.pod_name}-{_prod(self.shape) * self.chip.cores_in_name}'

  @property
  def chips_per_host(self) -> tuple[int, int, int]:
    """Host bounds as Cloud TPU VMs have them: one host for slices of up to 8 v5e / v6e chips
    (v5litepod-8 is one VM), otherwise 4 chips (2x2) per host."""
    n = _prod(self.shape)
    if n <= 8 and self.chip.dims == 2:
      return (*self.shape, 1)  # type: ignore[return-value]
    return (2, 2, 1) if n >= 4 else (*self.shape, 1)  # type: ignore[return-value]

  def __str__(self) -> str:
    slices = f' x {self.num_slices} slices' if self.num_slices > 1 else ''
    return f'{self.accelerator_type} ({self.topology}{slices})'


_ACCELERATOR = re.compile(r'(v4|v5p|v5e|v5litepod|v6e)-(\d+)')
_TOPOLOGY = re.compile(r'(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)')


def parse_target(text: str) -> Target:
  """'v5e-8', 'v5litepod-8', 'v4-32' (TensorCores: 16 chips), 'v5p-8' (4 chips), 'v6e-8', or a
  libtpu topology 'v5e:2x4', 'v5p:2x2x1'; ',slices=N' for N slices. One-line ValueError else."""
  name, *opts = [s.strip() for s in text.split(',')]
  slices = 1
  for opt in opts:
    key, _, value = opt.partition('=')
    if key != 'slices' or not value.isdigit() or int(value) < 1:
      raise ValueError(f'--plan={text}: unknown option {opt!r}; the only option is slices=N')
    slices = int(value)
  m = _ACCELERATOR.fullmatch(name)
  if m:
    chip = TPUS['v5e' if m.group(1) == 'v5litepod' else m.group(1)]
    count = int(m.group(2))
    if count % chip.cores_in_name:
      raise ValueError(f'--plan={text}: {m.group(1)}-N counts TensorCores, two per chip; N is even')
    try:
      return Target(chip, torus(chip, count // chip.cores_in_name), slices)
    except ValueError as e:
      raise ValueError(f'--plan={text}: {e}') from None
  m = _TOPOLOGY.fullmatch(name)
  if m:
    chip = TPUS[m.group(1)]
    shape = tuple(int(s) for s in m.group(2).split('x'))
    if len(shape) != chip.dims or 0 in shape:
      example = '2x2x1' if chip.dims == 3 else '2x4'
      raise ValueError(
        f'--plan={text}: a {chip.name} topology has {chip.dims} sides, e.g. {example}'
      )
    return Target(chip, shape, slices)
  raise ValueError(
    f'--plan={text}: not a TPU; give a Cloud TPU accelerator type (v4-8, v5litepod-8, v5p-8, '
    'v6e-8), a libtpu topology (v5e:2x4, v5p:2x2x1), optionally with ,slices=N, or local'
  )


def _tpu_on_this_machine() -> bool:
  """A Google TPU on this machine's PCI bus (vendor 0x1ae0, as jax's hardware_utils looks)."""
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(vendor) as f:
        if f.read().strip() == '0x1ae0':
          return True
    except OSError:
      continue
  return False


def quiet_libtpu() -> None:
  """Before JAX starts: on a machine without a TPU where libtpu is installed (the tests' and the
  planner's requirements), JAX would load libtpu at start-up and libtpu prints a dozen lines of
  errors about the missing TPU metadata. Where nothing but the CPU can serve (no TPU, no GPU
  plugin) and JAX_PLATFORMS is not set, ask JAX for the CPU: the backend it would end up with."""
  if 'JAX_PLATFORMS' in os.environ or importlib.util.find_spec('libtpu') is None:
    return
  gpu = any(m.name.startswith(('jax_cuda', 'jax_rocm')) for m in pkgutil.iter_modules())
  if not gpu and not _tpu_on_this_machine():
    os.environ['JAX_PLATFORMS'] = 'cpu'
    if 'jax' in sys.modules:  # imported already (JAX reads the variable at import): its config
      sys.modules['jax'].config.update('jax_platforms', 'cpu')


def plan_environment(target: Target) -> None:
  """Before JAX starts, for a plan on compile-only devices of ``target``: the CPU as JAX's own
  backend, and libtpu told the accelerator it compiles for (otherwise it queries the missing
  Cloud TPU metadata server and prints errors)."""
  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ['TPU_SKIP_MDS_QUERY'] = '1'
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', target.accelerator_type)
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  # libtpu takes a machine-wide lock at start-up, for the chips; compile-only devices have none,
  # and without this a second plan (or a test worker) fails while the first one compiles.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
