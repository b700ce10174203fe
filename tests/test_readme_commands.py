"""The README's commands, run as a user runs them.

Every command of README.md's ```bash blocks is extracted. Each is either run here, from a scratch
directory outside the repository (holding only links to main.py, configs/, the packages and
teachers/), or listed in SKIPPED with the reason it cannot run on this machine. Placeholders are
environment variables the README names ($WD, $TFDS, $MANUAL, $CKPT, $BUCKET, ...), set to real
things: a fake ImageNet written by moma_jax/data/fake_imagenet.py and prepared by the real tfds
builder, official-format PyTorch checkpoints written in the test (tiny ViTs at 224 px, patch 16),
and a GCS emulator bucket for the gs:// converter commands. Training commands are shortened only
with --config overrides (steps; batch sizes of the ImageNet configs); a --workdir under /tmp is
moved into the test's scratch directory.

Training for real costs 20-40 s a command here, so only the commands that others depend on or that
nothing else trains run in full: the first ImageNet command (prepares the fake ImageNet through
tfds, trains, exports), the first fine-tuning and linear-probe commands (on that export), the k-NN
command and the first runlocal command. The others run with --dry_run: validation, the dataset,
every checkpoint, the model, optimizer and evaluators are all built, nothing is compiled; their
configs train in-process in tests/test_family.py, test_train.py and test_eval.py.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from moma_jax.data import fake_imagenet

import torch_reference as ref

# One worker runs this module: its sandbox and converted checkpoints are made once, not per worker.
pytestmark = pytest.mark.xdist_group('readme_commands')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')

# Commands that cannot run here, by their first words, with the reason.
SKIPPED = {
  'python3 -m venv': 'the install lines themselves: CI runs them (.ci/run); their main job runs below',
  'pip install': 'installation',
  'python -m pytest': 'the test suite itself',
  'python -m moma_jax.experiments.small_scale': '20 minutes; a CI-sized run is in tests/test_experiments.py',
  'python -m moma_jax.experiments.finetune_yardstick': '30 minutes; its resume and report are tested in tests/test_experiments.py',
  'python -m moma_jax.experiments.teachers': '15 minutes; the shipped files are checked in tests/test_experiments.py',
  'python benchmarks/': 'benchmarks (timings, minutes to hours); not tests',
  'python scripts/fault_injection.py': 'minutes; a CI-sized run is in tests/test_reliability.py',
  'gcloud': 'Cloud TPU only',
  'tfds build': 'needs the internet',
}
# Commands that need data that cannot be had offline.
NEEDS_INTERNET = ('configs/transfer_cifar.py',)  # CIFAR-100 through tfds

# Two steps, no k-NN passes (the trainer's k-NN is run by tests/test_train.py's command-1 test and
# the k-NN commands below): what remains is each command's config, data, models, step and export.
SHORT = [
  '--config.num_train_steps=2', '--config.log_every=1', '--config.checkpoint_every=2',
  '--config.evaluators.knn.at_end=False',
]  # fmt: skip
# ImageNet configs: the paper's batch of 4096 and 1024-image evaluation batches, cut for a CPU.
SHORT_IMAGENET = SHORT + [
  '--config.batch_size=8', '--config.evaluators.knn.batch_size=8',
  '--config.evaluators.knn.max_train=16',
]  # fmt: skip


# The README and the pages its details moved to: their bash blocks are run alike, in this order.
PAGES = [README] + [
  os.path.join(ROOT, 'docs', f'{n}.md')
  for n in ('training', 'convert', 'data', 'reliability', 'performance', 'testing')
]


def readme_commands() -> list[str]:
  """Every command line of the README's (and its detail pages') bash blocks: continuations joined,
  comments dropped."""
  text = '\n'.join(open(p).read() for p in PAGES)
  out = []
  for block in re.findall(r'```bash\n(.*?)```', text, re.S):
    for line in block.replace('\\\n', ' ').splitlines():
      line = re.sub(r'\s+#\s.*$', '', line).strip()
      if line and not line.startswith('#'):
        out.append(' '.join(line.split()))
  return out


def _skip_reason(cmd: str) -> str | None:
  for prefix, why in SKIPPED.items():
    if cmd.startswith(prefix):
      return why
  if any(n in cmd for n in NEEDS_INTERNET):
    return 'needs a dataset that cannot be downloaded here'
  return None


def _kind(cmd: str) -> str:
  if cmd.startswith(('python -m convert', 'moma-convert')):
    return 'convert'
  if cmd.startswith(('python -m moma_jax.evaluators.knn', 'moma-knn')):
    return 'knn'
  if cmd.startswith('python -m moma_jax.data.fake_imagenet'):
    return 'fake_imagenet'
  if cmd.startswith(('python main.py', 'moma-train')) and '--plan=' in cmd:
    return 'plan'
  if cmd.startswith(('python main.py', 'moma-train')):
    return 'runlocal' if ':runlocal' in cmd else 'imagenet'
  raise AssertionError(f'README command not handled by this test (add it or skip it): {cmd}')


def test_both_opening_commands_install_the_package():
  """`python -m moma_jax...` and the moma-* commands work outside the clone after either of the
  README's two opening commands (issue 31: command 1 used to install only the requirements)."""
  first, second = readme_commands()[:2]
  test_reqs = open(os.path.join(ROOT, 'requirements-test.txt')).read().split()
  for cmd in (first, second):
    install = cmd.split('pip install', 1)[1].split('&&')[0].split()
    assert (
      '.' in install
      and install[install.index('.') - 1] == '-e'
      or ('requirements-test.txt' in install and '.' in test_reqs)
    ), cmd


def test_every_readme_command_is_run_or_skipped_with_a_reason():
  kinds = {}
  for cmd in readme_commands():
    if _skip_reason(cmd) is None:
      kinds.setdefault(_kind(cmd), []).append(cmd)
  # What the tests below cover: the README must keep having each kind.
  assert {'convert', 'knn', 'runlocal', 'imagenet', 'plan'} <= set(kinds), kinds


# --- the sandbox ------------------------------------------------------------------------------------


def _official_files(d) -> None:
  """Tiny official-format checkpoints under the README's file names (ViTs 192 wide, 2 deep, 224 px,
  patch 16: 3 heads for MAE / timm, as the converter assumes for that width; 12 for MoCo v3)."""
  torch.manual_seed(0)
  vit = dict(img_size=224, patch=16, dim=192, depth=2)
  for name in ('mae_pretrain_vit_base.pth', 'mae_pretrain_vit_large.pth'):
    ref.save_mae(ref.VisionTransformer(**vit, heads=3), str(d / name))
  ref.save_mae(
    ref.VisionTransformer(**vit, heads=3, decoder_dim=64, decoder_depth=1, decoder_heads=16),
    str(d / 'mae_visualize_vit_large.pth'),
  )
  ref.save_mae(
    ref.VisionTransformer(**vit, heads=3, num_classes=10, global_pool=True),
    str(d / 'mae_finetuned_vit_base.pth'),
  )
  ref.save_mocov3(ref.VisionTransformer(**vit, heads=12), str(d / 'vit-b-300ep.pth.tar'))
  ref.save_mocov3(
    ref.VisionTransformer(**vit, heads=12), str(d / 'vit-s-300ep.pth.tar'), arch='vit_small'
  )
  timm = ref.VisionTransformer(**vit, heads=3, num_classes=10)
  torch.save(timm.state_dict(), str(d / 'deit_small_patch16_224.pth'))
  ref.save_safetensors(timm, str(d / 'model.safetensors'))


@pytest.fixture(scope='module')
def sandbox(tmp_path_factory):
  d = tmp_path_factory.mktemp('user')
  for name in ('main.py', 'configs', 'moma_jax', 'convert', 'teachers'):
    os.symlink(os.path.join(ROOT, name), d / name)
  _official_files(d)
  from runlocal_helpers import FAST_COMPILE

  env = {**os.environ, 'XLA_FLAGS': FAST_COMPILE}  # one device; -O1 (see runlocal_helpers)
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=str(d))
  for var in ('WD', 'WD2', 'WD3', 'FT', 'FT2', 'FT3', 'LP', 'LP2', 'TR'):
    env[var] = str(d / 'runs' / var.lower())
  env.update(TFDS=str(d / 'tfds'), MANUAL=str(d / 'manual'), CKPT=str(d / 'ckpt' / 'mae_b16'))
  return d, env


def _run(
  cmd: str, sandbox, extra: list[str] = (), timeout: int = 600
) -> subprocess.CompletedProcess:
  d, env = sandbox
  args = shlex.split(cmd)
  for i, a in enumerate(args):  # a --workdir under /tmp goes into the scratch directory
    if a.startswith('--workdir=/tmp/'):
      args[i] = f'--workdir={d}/tmp/{a[len("--workdir=/tmp/") :]}'
  args = [re.sub(r'\$(\w+)', lambda m: env[m.group(1)], a) for a in args]
  if args[0] == 'python':
    args[0] = sys.executable
  elif args[0].startswith('moma-'):  # the console scripts of `pip install -e .`
    args[0] = os.path.join(os.path.dirname(sys.executable), args[0])
  p = subprocess.run(
    [*args, *extra], cwd=d, env={**env, 'PATH': os.path.dirname(sys.executable) + ':' + env['PATH']},
    capture_output=True, text=True, timeout=timeout,
  )  # fmt: skip
  assert p.returncode == 0, f'{cmd}\n{p.stderr[-3000:]}'
  return p


def _commands(kind: str) -> list[str]:
  """The README's commands of this kind, each once (a command the pages repeat runs once)."""
  cmds = [c for c in readme_commands() if _skip_reason(c) is None and _kind(c) == kind]
  return list(dict.fromkeys(cmds))


@pytest.fixture(scope='module')
def converted(sandbox):
  """The README's converter commands, in order (the ckpt/ directories the others use)."""
  from gcs_emulator import emulator_env, gcs_emulator, upload

  d, env = sandbox
  with gcs_emulator() as (url, bucket):
    gcs_env = {**env, **emulator_env(url), 'BUCKET': bucket, 'PYTHONPATH': env['PYTHONPATH']}
    upload(url, bucket, str(d / 'vit-b-300ep.pth.tar'), 'vit-b-300ep.pth.tar')
    for cmd in _commands('convert'):
      _run(cmd, (d, gcs_env) if 'gs://' in cmd else sandbox)
  return d


def test_readme_converter_commands(converted):
  for name in ('mae_b16', 'mae_l16', 'mae_l16_full', 'mocov3_b16', 'deit_s16', 'timm_b16_half'):
    assert (converted / 'ckpt' / name / 'metadata.json').exists(), name
  assert (converted / 'mae_b16_roundtrip.pth').exists()


def test_readme_imagenet_commands(converted, sandbox):
  """The ImageNet commands against a fake ImageNet: the first prepares it from $MANUAL through
  the real tfds imagenet2012 builder; fine-tuning then reads the first run's export."""
  d, env = sandbox
  fake_imagenet.write_manual_dir(env['MANUAL'], num_classes=4, images_per_class=5, num_val=8)
  cmds = _commands('imagenet') + _commands('knn')
  assert (
    cmds[0].startswith('python main.py --config=configs/moco_to_mae.py ') and '$MANUAL' in cmds[0]
  )
  full_configs = {'finetune.py', 'linear_probe.py'}  # the first of each runs in full
  # A dry run of the first command prepares nothing (it would take hours on ImageNet): it says
  # the run will, and plans with the catalogue's sizes.
  p = _dry_run(cmds[0], sandbox, SHORT_IMAGENET)
  assert not os.path.exists(env['TFDS']) or not os.listdir(env['TFDS']), os.listdir(env['TFDS'])
  assert 'train_examples 1,281,167 (catalogue)' in p.stdout, p.stdout
  assert 'imagenet2012 is not prepared in data_dir=' in p.stdout, p.stdout
  for i, cmd in enumerate(cmds):
    if cmd.startswith(('python -m moma_jax.evaluators.knn', 'moma-knn')):
      p = _run(cmd, sandbox, ['--batch_size=8', '--max_train=16'])
      assert re.search(r'knn/top1: \d+\.\d+%', p.stdout), p.stdout
      continue
    config = re.search(r'--config=configs/([\w.]+)', cmd).group(1)
    extra = SHORT_IMAGENET
    if config in ('finetune.py', 'linear_probe.py'):
      extra = extra + ['--config.evaluators.classification.batch_size=8']
    if i == 0:  # with the final evaluation: every baseline row an ImageNet summary needs
      p = _run(cmd, sandbox, [a for a in extra if a != '--config.evaluators.knn.at_end=False'])
      assert re.search(r': 2/2 steps in \d+ s', p.stdout), (cmd, p.stdout)
      for row in ('student (before -> after)', 'teacher moco', 'random-init student', 'raw pixels',
                  'chance'):  # fmt: skip
        assert re.search(rf'^  {re.escape(row)} .*%', p.stdout, re.M), (row, p.stdout)
    elif config in full_configs:
      full_configs.discard(config)
      p = _run(cmd, sandbox, extra)
      assert re.search(r': 2/2 steps in \d+ s', p.stdout), (cmd, p.stdout)
    else:
      _dry_run(cmd, sandbox, extra)


def _dry_run(cmd: str, sandbox, extra: list[str]) -> subprocess.CompletedProcess:
  d, env = sandbox
  workdir = re.search(r'--workdir=(\S+)', cmd).group(1)
  path = re.sub(r'\$(\w+)', lambda m: env[m.group(1)], workdir.replace('/tmp/', f'{d}/tmp/', 1))
  before = (
    sorted(os.walk(path)) if os.path.exists(path) else None
  )  # a workdir an earlier command used
  p = _run(cmd, sandbox, [*extra, '--dry_run'])
  assert re.search(r': dry run, nothing written; mesh .* num_train_steps 2,', p.stdout), p.stdout
  assert (sorted(os.walk(path)) if os.path.exists(path) else None) == before, path
  return p


RUNLOCAL = _commands('runlocal')


@pytest.mark.parametrize('cmd', RUNLOCAL)
def test_readme_runlocal_command(cmd, sandbox):
  if cmd == RUNLOCAL[0]:
    p = _run(cmd, sandbox, SHORT)
    assert re.search(r': 2/2 steps in \d+ s', p.stdout), p.stdout
  else:
    _dry_run(cmd, sandbox, SHORT)


@pytest.mark.parametrize('cmd', _commands('plan'))
def test_readme_plan_command(cmd, sandbox):
  """A --plan command compiles the full-size step for a TPU slice (no TPU here); XLA's effort
  is lowered for the test (JAX_EXEC_TIME_OPTIMIZATION_EFFORT=-1: minutes -> seconds), nothing else
  changes. It prints the plan and writes nothing (no --workdir)."""
  d, env = sandbox
  before = sorted(os.listdir(d))
  p = _run(cmd, (d, {**env, 'JAX_EXEC_TIME_OPTIMIZATION_EFFORT': '-1'}))
  assert 'planned (compiled, nothing run)' in p.stdout and ': fits' in p.stdout, p.stdout
  assert p.stderr == '', p.stderr[-2000:]
  assert sorted(os.listdir(d)) == before
