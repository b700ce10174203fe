"""--plan (moma_jax/plan.py): the trainer's own step compiled for Cloud TPU slices that are not here,
through libtpu's compile-only devices; accelerator names, chips, the fit verdict and its one-line
refusal, FSDP and multi-slice, the JSON, and quiet output. The compiles run in subprocesses (libtpu
reads its environment when JAX starts) with fewer blocks (tests/plan_helpers.py says why)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moma_jax import hardware
from moma_jax.data import augment, pipeline, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, 'tests', 'plan_helpers.py')
GiB = 2**30


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'XLA_FLAGS')}
  return {**env, 'JAX_EXEC_TIME_OPTIMIZATION_EFFORT': '-1', **extra}


def _plans(jobs, depth=1):
  r = subprocess.run(
    [sys.executable, HELPER, str(depth), json.dumps(jobs)],
    capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900,
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
  'name, topology, chips',
  [
    ('v4-8', 'v4:2x2x1', 4),  # v4-N and v5p-N count TensorCores, two per chip
    ('v4-32', 'v4:2x2x4', 16),
    ('v4-128', 'v4:4x4x4', 64),
    ('v5p-8', 'v5p:2x2x1', 4),
    ('v5p-256', 'v5p:4x4x8', 128),
    ('v5litepod-1', 'v5e:1x1', 1),  # v5litepod-N and v6e-N count chips
    ('v5litepod-8', 'v5e:2x4', 8),
    ('v5e-16', 'v5e:4x4', 16),
    ('v5litepod-256', 'v5e:16x16', 256),
    ('v6e-8', 'v6e:2x4', 8),
    ('v5e:2x2', 'v5e:2x2', 4),
    ('v5p:2x2x1', 'v5p:2x2x1', 4),
  ],
)
def test_cloud_tpu_names_map_to_libtpu_topologies(name, topology, chips):
  t = hardware.parse_target(name)
  assert (t.topology, t.chips, t.num_slices) == (topology, chips, 1)
  two = hardware.parse_target(f'{name},slices=2')
  assert (two.topology, two.chips, two.num_slices) == (topology, 2 * chips, 2)


def test_cloud_tpu_hosts_as_the_vms_have_them():
  assert hardware.parse_target('v5litepod-8').chips_per_host == (2, 4, 1)  # one VM of 8 chips
  assert hardware.parse_target('v5litepod-16').chips_per_host == (2, 2, 1)  # 4 per VM beyond
  assert hardware.parse_target('v4-32').chips_per_host == (2, 2, 1)
  assert hardware.parse_target('v5litepod-1').chips_per_host == (1, 1, 1)


@pytest.mark.parametrize(
  'bad, says',
  [
    ('v5litepod-6', 'power of two'),
    ('v4-2', 'power of two >= 4'),
    ('v4-7', 'two per chip'),
    ('v5e:2x2x1', '2 sides'),
    ('h100', 'not a TPU'),
    ('v5e-8,slices=0', 'slices=N'),
    ('v5e-8,chips=4', 'slices=N'),
  ],
)
def test_bad_targets_are_one_line_errors(bad, says):
  with pytest.raises(ValueError, match=says) as e:
    hardware.parse_target(bad)
  assert '\n' not in str(e.value) and bad in str(e.value)


def test_device_kinds_map_to_their_chips():
  # 'TPU v5' is a v5p and must not be read as a v5e ('TPU v5 lite'); MFU was never logged on it.
  assert hardware.chip_of('TPU v5').name == 'v5p'
  assert hardware.peak_flops('TPU v5') == 459e12
  assert hardware.chip_of('TPU v5 lite').name == 'v5e'
  assert hardware.peak_flops('TPU v6 lite') == 918e12
  assert hardware.peak_flops('TPU v4') == 275e12
  assert hardware.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert hardware.peak_flops('cpu') is None
  assert hardware.TPUS['v5e'].ridge == pytest.approx(197e12 / 0.82e12)


@pytest.mark.parametrize('device_photometric', [False, True])
def test_batch_spec_is_what_the_pipeline_yields(device_photometric):
  """The plan compiles for pipeline.batch_spec; the stream must yield exactly that."""
  views = {
    'teacher': augment.ViewSpec(size=32, scale=(0.5, 1.0)),
    'strong': augment.moco_strong_view(32, blur_prob=0.0, solarize_prob=0.0),
  }
  src = sources.open_split('digits', 'train', process_index=0, process_count=1)
  it = pipeline.train_iterator(
    src, views, batch_size=4, seed=0, process_index=0, device_photometric=device_photometric
  )
  batch = next(iter(it))
  spec = pipeline.batch_spec(views, 4, device_photometric)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec


MOMA = ('moco_to_mae', 'mae_to_moco', 'multi_teacher')


_HLO = """HloModule step
ENTRY %main.1 (param.1: f32[768,3072]) -> f32[192,3072] {
  %param.1 = f32[768,3072]{1,0:T(8,128)} parameter(0)
  %slice-start.1 = ((f32[768,3072]{1,0:T(8,128)}), f32[192,3072]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%param.1), slice={[0:192], [0:3072]}
  %slice-done.1 = f32[192,3072]{1,0:T(8,128)S(1)} slice-done(%slice-start.1)
  %fusion.1 = bf16[192,3072]{1,0:T(8,128)(2,1)S(1)} fusion(%slice-done.1), kind=kLoop, calls=%f1, metadata={op_name="jit(step)/jvp(teacher)/ViT/blocks_3/mlp/convert_element_type"}
  %fusion.2 = f32[192,3072]{1,0:T(8,128)} fusion(%fusion.1, %param.1), kind=kLoop, calls=%f2, metadata={op_name="jit(step)/transpose(jvp(student))/ViT/blocks_11/mlp/add"}
  %copy-start.1 = (f32[192,3072]{1,0:T(8,128)}, f32[192,3072]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%fusion.2)
  ROOT %copy-done.1 = f32[192,3072]{1,0:T(8,128)} copy-done(%copy-start.1)
}
"""  # noqa: E501  (HLO lines as XLA prints them)


def test_hbm_traffic_counts_only_what_lives_in_hbm():
  """By hand: the async slice reads its 192 rows from HBM once into VMEM (S(1)); the convert
  reads and writes VMEM only; the add reads VMEM and the whole HBM parameter and writes HBM; the
  copy reads and writes HBM. Sources fold the block index and drop the autodiff wrappers."""
  from moma_jax import plan

  rows, full = 192 * 3072 * 4, 768 * 3072 * 4
  t = plan.hbm_traffic(_HLO)
  assert t.hbm_bytes == rows + (full + rows) + 2 * rows
  shares = dict(t.by_source)
  assert shares['student/ViT/blocks_*/mlp'] == (full + rows) / t.hbm_bytes
  assert shares['teacher/ViT/blocks_*/mlp'] == 0.0
  # a loop's body is another computation, run an unknown number of times: no total claimed
  looped = _HLO.replace(
    'ROOT %copy-done.1', '%w = (s32[]) while(%param.1), body=%b\n  ROOT %copy-done.1'
  )
  assert plan.hbm_traffic(looped).hbm_bytes is None


def test_shipped_full_configs_fsdp_and_two_slices_compile_and_fit():
  """Each full MOMA config and MAE / MoCo v3 pre-training at the paper's batch (4096) on a
  v5litepod-8, through the trainer's set-up: fits, batch split, XLA FLOPs = the formula +- 5%
  (the MOMA configs' teachers take the flash kernel there: their 197 tokens padded to 256 add
  work the formula does not count, and XLA's attention stands in for the check). Then moco_to_mae
  with FSDP and over two slices. One subprocess compiles all eight."""
  names = [*MOMA, 'mae_pretrain', 'mocov3_pretrain']
  plans = _plans([{'config': n, 'target': 'v5litepod-8'} for n in names] + [
    {'config': 'moco_to_mae', 'target': 'v5litepod-8',
     'overrides': {'mesh': {'data': 1, 'fsdp': -1}}},
    {'config': 'moco_to_mae', 'target': 'v5e:2x2,slices=2'},
    {'config': 'moco_to_mae', 'target': 'v5litepod-8',
     'overrides': {'mesh': {'data': 2, 'fsdp': -1}, 'teacher_attention': 'xla'}},
  ])  # fmt: skip
  plans, (fsdp, slices, xla) = plans[: len(names)], plans[len(names) :]
  for name, p in zip(names, plans, strict=True):
    assert 'error' not in p, (name, p)
    assert p['fits'] and p['hbm_bytes_per_chip'] <= p['hbm_capacity_bytes'] == 15.75 * GiB, name
    assert (p['chips'], p['hosts'], p['global_batch'], p['per_chip_batch']) == (8, 1, 4096, 512)
    assert p['mesh'] == {'data': 8, 'fsdp': 1} and p['device_kind'] == 'TPU v5 lite'
    flops = p['flops_per_step'] / p['formula_flops_per_step']
    assert 0.95 < flops < (1.15 if name in MOMA else 1.05), (name, p)
    assert 0 < p['mfu_bound'] <= 1 and p['roofline_step_seconds'] > 0
    # HBM traffic: part of XLA's all-memory-space count, and at least one pass over the state,
    # the frozen teachers and the batch (each is read from HBM at least once per step)
    assert p['hbm_traffic_counted_from_hlo'], name
    least = p['state_bytes_per_chip'] + p['frozen_bytes_per_chip'] + p['batch_bytes_per_chip']
    assert least < p['hbm_traffic_per_chip'] < p['bytes_accessed_per_chip'], (name, p)
    # the shipped MOMA configs: a bf16 teacher through the flash kernel on a TPU (teacher_attention
    # 'auto'), the student in float32
    if name in MOMA:
      teachers = [m for m in p['models'] if m.startswith('teacher')]
      assert teachers and all(m.endswith('bfloat16, flash attention') for m in teachers), p
      assert any(m.startswith('student') and 'float32' in m for m in p['models']), p
  assert abs(xla['flops_per_step'] / xla['formula_flops_per_step'] - 1) < 0.05, xla
  assert not any('flash' in m for m in xla['models']) and xla['mesh'] == {'data': 2, 'fsdp': 4}
  by_name = dict(zip(names, plans, strict=True))
  # The strong view's colour jitter / blur run inside the step on a TPU (data.photometric auto).
  assert by_name['moco_to_mae']['photometric_on_device']
  assert not by_name['mae_to_moco']['photometric_on_device']  # no strong view to augment
  assert by_name['moco_to_mae']['steps_per_epoch'] == 1_281_167 // 4096  # ImageNet, not read
  assert by_name['moco_to_mae']['total_steps'] == 100 * (1_281_167 // 4096)  # 100 epochs

  dp = by_name['moco_to_mae']
  # The teacher's Pallas flash attention compiles for the TPU shard_mapped over FSDP.
  assert any(m.endswith('flash attention') for m in fsdp['models']), fsdp
  assert fsdp['mesh'] == {'data': 1, 'fsdp': 8} and fsdp['fits']
  # FSDP splits the trained parameters and the optimizer state over the 8 chips (the teacher is
  # split too: frozen_sharding_rules), so far less of them sits on each chip.
  assert fsdp['state_bytes_per_chip'] < dp['state_bytes_per_chip'] / 6
  assert fsdp['frozen_bytes_per_chip'] < dp['frozen_bytes_per_chip'] / 6
  views, label, seeds = 2 * 512 * 224 * 224 * 3, 512 * 4, 512 * 8  # uint8, int32, uint32 [2]
  assert fsdp['batch_bytes_per_chip'] == dp['batch_bytes_per_chip'] == views + label + seeds
  assert fsdp['hbm']['arguments'] < dp['hbm']['arguments']
  assert slices['chips'] == 8 and slices['mesh'] == {'data': 8, 'fsdp': 1} and slices['fits']
  assert '2 slices' in slices['target']
  assert abs(slices['flops_per_step'] / dp['flops_per_step'] - 1) < 0.01


def test_a_step_that_cannot_fit_is_refused_in_one_line(tmp_path):
  """One v5e chip, batch 4096, an L/16 teacher (full depth): XLA's RESOURCE_EXHAUSTED at compile
  becomes one line with what is over and which change makes it fit; exit 1."""
  out = tmp_path / 'plan.json'
  r = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'main.py'), '--config=mae_to_moco', '--plan=v5litepod-1',
     '--config.teachers.mae.variant=L/16', f'--plan_json={out}'],
    capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600,
  )  # fmt: skip
  assert r.returncode == 1, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr[-3000:]
  line = lines[0]
  assert line.startswith('error: the step does not fit on v5litepod-1 (v5e:1x1) at batch 4096')
  assert 'GiB per chip needed, 15.75 GiB available' in line
  assert '--config.batch_size=' in line and '--config.student.remat=block' in line
  assert 'fsdp' not in line  # one chip: nothing to split over
  assert not out.exists() and r.stdout == ''


def test_plan_prints_a_table_writes_json_and_nothing_else(tmp_path):
  """The command as users type it (no --workdir), from outside the repository, quiet: the table
  on stdout, nothing on stderr (libtpu's start-up errors included), the JSON's figures."""
  out = tmp_path / 'plan.json'
  r = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'main.py'), '--config=moco_to_mae:runlocal',
     '--plan=v5litepod-8', f'--plan_json={out}'],
    capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600,
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stderr == '', r.stderr[-3000:]
  assert 'moco_to_mae planned (compiled, nothing run):' in r.stdout
  assert 'v5litepod-8 (v5e:2x4): 8 chips, 1 hosts, TPU v5 lite' in r.stdout
  assert 'MFU bound' in r.stdout and 'fits' in r.stdout
  p = json.loads(out.read_text())
  for key in ('flops_per_step', 'hbm_bytes_per_chip', 'hbm_capacity_bytes', 'fits',
              'roofline_step_seconds', 'images_per_second', 'mfu_bound'):  # fmt: skip
    assert key in p, key
  assert p['fits'] is True and p['per_chip_batch'] == 8 and p['total_steps'] == 600
  assert p['steps_per_epoch'] == 5748 // 64  # the embedded digits' train split, metadata only
  assert sorted(os.listdir(tmp_path)) == ['plan.json']
  # Where the HBM traffic goes, by JAX source (named scopes of the objective and the augmentation).
  shares = dict(p['hbm_traffic_by_source'])
  assert 0.5 < sum(shares.values()) <= 1.0 + 1e-9
  assert any(k.startswith('teacher_moco/ViT/blocks_*') for k in shares), shares
  assert any(k.startswith('photometric_strong') for k in shares), shares
  assert 'HBM traffic' in r.stdout


def test_plan_local_needs_no_libtpu_and_reports_the_cpu():
  r = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'main.py'), '--config=moco_to_mae:runlocal',
     '--plan=local'],
    capture_output=True, text=True, env={**_env(), 'JAX_PLATFORMS': 'cpu'}, cwd=ROOT,
    timeout=600,
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'local (1 x cpu)' in r.stdout and 'HBM per chip' in r.stdout
  assert 'roofline' not in r.stdout  # no chip figures for a CPU


@pytest.mark.parametrize(
  'args, says',
  [
    (['--plan=v5litepod-6'], 'power of two'),
    (['--plan=v5e-8', '--config.batch_size=100'], 'not divisible by the 8 data-parallel'),
    (['--plan_json=x.json'], '--plan_json: only with --plan'),
    ([], '--workdir: give a directory'),
  ],
)
def test_plan_bad_input_is_one_line_before_any_compile(args, says):
  r = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'main.py'), '--config=moco_to_mae', *args],
    capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300,
  )  # fmt: skip
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.count('\n') == 1 and says in r.stderr, r.stderr[-2000:]


def test_quiet_libtpu_only_where_nothing_but_the_cpu_can_serve(monkeypatch):
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.setattr(hardware, '_tpu_on_this_machine', lambda: True)
  hardware.quiet_libtpu()
  assert 'JAX_PLATFORMS' not in os.environ  # a TPU VM keeps JAX's own choice
  monkeypatch.setattr(hardware, '_tpu_on_this_machine', lambda: False)
  hardware.quiet_libtpu()
  assert os.environ['JAX_PLATFORMS'] == 'cpu'
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  hardware.quiet_libtpu()
  assert os.environ['JAX_PLATFORMS'] == 'cuda'  # the user's choice always wins
