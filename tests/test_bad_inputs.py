"""Every bad input a user is likely to give: one line on stderr that names the setting and what to
do, exit code 2 (usage) or 1 (runtime), and the workdir byte-identical before and after.

Each case runs the real command line in a subprocess. Most are refused by moma_jax/validate.py
before JAX is imported (about a second each); a few only the trainer can find.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from convert import torch_format
from moma_jax.experiments import teachers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, 'main.py')


def _config(name: str, arg: str = 'runlocal') -> str:
  return f'--config={os.path.join(ROOT, "configs", name)}.py' + (f':{arg}' if arg else '')


M2M = _config('moco_to_mae')
MAE = _config('mae_pretrain')
DINO = _config('dino_pretrain')
MOKD = _config('mokd')

# (id, command (WD, FILES substituted), expected exit code, expected text in the error line)
CASES = [
  ('misspelt-key', [M2M, '--config.data.dat_dir=x'], 2, 'Did you mean --config.data.data_dir'),
  ('misspelt-section', [M2M, '--config.studnt.variant=S/16'], 2, 'mean --config.student.variant'),
  (  # the flag named is the wrong one, not the first override; another trainer's name is mapped
    'unknown-key-after-a-good-one',
    [M2M, '--config.seed=1', '--config.total_steps=6'],
    2,
    '--config.total_steps: no such config key. Did you mean --config.num_train_steps',
  ),
  (
    'bad-type',
    [M2M, '--config.batch_size=abc'],
    2,
    "invalid literal for int() with base 10: 'abc'",
  ),
  ('bad-config-arg', [_config('moco_to_mae', 'runlocl')], 2, "unknown config argument 'runlocl'"),
  ('arg-without-value', [_config('multi_teacher', 'variant')], 2, "'variant' needs a value"),
  ('no-config-file', ['--config=configs/nope.py'], 2, 'nope.py'),
  ('no-workdir', [M2M, None], 2, 'workdir'),
  ('workdir-is-file', [M2M, '--workdir={FILES}/plain.txt'], 2, 'is a file; give a directory'),
  ('workdir-under-file', [M2M, '--workdir={FILES}/plain.txt/run'], 2, 'cannot be created'),
  ('batch-zero', [M2M, '--config.batch_size=0'], 2, 'batch_size=0: must be > 0'),
  ('batch-negative', [M2M, '--config.batch_size=-8'], 2, 'batch_size=-8'),
  ('steps-negative', [M2M, '--config.num_train_steps=-1'], 2, 'num_train_steps=-1: must be >= 0'),
  ('epochs-zero', [M2M, '--config.num_train_steps=0', '--config.num_epochs=0'], 2, 'num_epochs'),
  ('log-every-zero', [M2M, '--config.log_every=0'], 2, 'log_every=0'),
  ('checkpoint-every-zero', [M2M, '--config.checkpoint_every=0'], 2, 'checkpoint_every=0'),
  ('keep-zero', [M2M, '--config.keep_checkpoints=0'], 2, 'keep_checkpoints=0'),
  ('stop-negative', [M2M, '--config.stop_at_step=-1'], 2, 'stop_at_step=-1'),
  ('mesh-zero', [M2M, '--config.mesh.data=0'], 2, 'sizes are positive'),
  ('mesh-two-rest', [M2M, '--config.mesh.fsdp=-1'], 2, 'at most one -1'),
  ('mesh-indivisible', [M2M, '--config.mesh.data=3'], 2, 'needs 3 devices'),
  ('optimizer-name', [M2M, '--config.optim.name=adam'], 2, "optim.name='adam'"),
  ('lr-zero', [M2M, '--config.optim.base_lr=0'], 2, 'optim.base_lr=0'),
  ('wd-negative', [M2M, '--config.optim.weight_decay=-0.1'], 2, 'optim.weight_decay=-0.1'),
  ('layer-decay', [M2M, '--config.optim.layer_decay=1.5'], 2, 'optim.layer_decay=1.5'),
  ('image-size', [M2M, '--config.data.image_size=0'], 2, 'image_size=0'),
  (  # both would have run to exit 0 and printed 100% in every row
    'one-class-folder',
    [M2M, '--config.data.name=folder:{FILES}/oneclass', '--config.data.eval_split=train'],
    2,
    'has 1 class: the k-NN / linear-probe / classification scores would be 100% by construction',
  ),
  (
    'batch-larger-than-data',
    [M2M, '--config.data.name=folder:{FILES}/twenty', '--config.data.eval_split=train'],
    2,
    'batch_size=64 is larger than the 20 training examples',
  ),
  (  # before JAX starts, naming the setting (the evaluators follow data.eval_split)
    'folder-without-eval-split',
    [M2M, '--config.data.name=folder:{FILES}/twenty'],
    2,
    "data.eval_split='test': ",
  ),
  (  # the views follow data.image_size; the shipped 32 px student cannot (read before JAX starts)
    'image-size-vs-checkpoint',
    [M2M, '--config.data.image_size=48'],
    2,
    'a ViT for 32px images but data.image_size=48; pass --config.data.image_size=32, or resample',
  ),
  (  # one view set on its own moves the others and the image size with it (one size for all)
    'image-size-vs-view',
    [M2M, '--config.data.views.teacher.size=48'],
    2,
    'a ViT for 32px images but data.image_size=48',
  ),
  ('folder-missing', [M2M, '--config.data.name=folder:{FILES}/nope'], 2, 'no such folder'),
  ('folder-is-file', [M2M, '--config.data.name=folder:{FILES}/plain.txt'], 2, 'is a file'),
  (
    'data-dir-missing',
    [M2M, '--config.data.name=imagenet2012', '--config.data.data_dir={FILES}/nope'],
    2,
    'data.data_dir',
  ),
  (
    'imagenet-unprepared',
    [M2M, '--config.data.name=imagenet2012', '--config.data.data_dir={FILES}/empty'],
    2,
    'not prepared',
  ),
  (
    'unknown-dataset',
    [M2M, '--config.data.name=no_such_dataset'],
    2,
    "unknown dataset 'no_such_dataset'",
  ),
  ('digits-split', [M2M, '--config.data.train_split=validation'], 2, 'digits has splits'),
  (
    'view-scale',
    [M2M, '--config.data.views.teacher.scale=(0.5,0.2)'],
    2,
    'data.views.teacher.scale',
  ),
  (  # the views share data.image_size (configs/common.set_views): the error names it
    'view-size',
    [M2M, '--config.data.views.teacher.size=0'],
    2,
    'data.image_size=0: must be > 0',
  ),
  ('knn-batch', [M2M, '--config.evaluators.knn.batch_size=0'], 2, 'batch_size=0'),
  ('knn-split', [M2M, '--config.evaluators.knn.eval_split=val'], 2, 'evaluators.knn.eval_split'),
  # DINO / MOKD: checked before JAX starts, as the other objectives (objectives/registry.py)
  ('dino-arch', [DINO, '--config.model.arch=resnet51'], 2, "model.arch='resnet51': unknown ResNet"),
  ('dino-temp', [DINO, '--config.dino.teacher_temp=0'], 2, 'dino.teacher_temp=0.0: must be > 0'),
  ('dino-local', [DINO, '--config.dino.num_local=6'], 2, 'dino reads local5, local6'),
  ('mokd-cnn', [MOKD, '--config.cnn.arch=S/16'], 2, "cnn.arch='S/16': a ResNet is needed here"),
  ('mokd-optim', [MOKD, '--config.optim_vit.base_lr=0'], 2, 'optim_vit.base_lr=0'),
  ('mokd-momentum', [MOKD, '--config.mokd.momentum=1.5'], 2, 'mokd.momentum=1.5'),
  ('mask-ratio', [M2M, '--config.moma.mask_ratio=1.0'], 2, 'moma.mask_ratio=1.0'),
  ('align', [M2M, '--config.moma.align=diag'], 2, "moma.align='diag'"),
  ('teacher-norm', [M2M, '--config.moma.teacher_norm=bn'], 2, "moma.teacher_norm='bn'"),
  ('beta', [M2M, '--config.moma.smooth_l1_beta=-1'], 2, 'moma.smooth_l1_beta'),
  (
    'projector-warmup',
    [M2M, '--config.moma.projector_warmup_steps=-1'],
    2,
    'moma.projector_warmup_steps=-1',
  ),
  ('projector-lr', [M2M, '--config.moma.projector_lr_scale=0'], 2, 'moma.projector_lr_scale=0'),
  ('projector-sgd', [M2M, '--config.optim.name=sgd'], 2, "need 'adamw'"),
  ('student-dtype', [M2M, '--config.student.dtype=float16'], 2, "student.dtype='float16'"),
  ('teacher-dtype', [M2M, '--config.teacher_dtype=int8'], 2, "teacher_dtype='int8'"),
  (
    'variant',
    [M2M, '--config.student.checkpoint=', '--config.student.variant=Q/4'],
    2,
    "unknown ViT variant 'Q/4'",
  ),
  ('student-view', [M2M, '--config.teachers.moco.student_view=both2'], 2, 'student_view'),
  ('teacher-weight', [M2M, '--config.teachers.moco.weight=-1'], 2, 'weight=-1'),
  (
    'teacher-missing',
    [M2M, '--config.teachers.moco.checkpoint={FILES}/nope.pth'],
    2,
    'no such file or directory',
  ),
  (
    'teacher-wrong-kind',
    [M2M, '--config.teachers.moco.checkpoint={MAE_FILE}'],
    2,
    'an MAE checkpoint (mae_full) where a MoCo v3 one is needed',
  ),
  (
    'teacher-garbage-pth',
    [M2M, '--config.teachers.moco.checkpoint={FILES}/garbage.pth'],
    2,
    'not a readable PyTorch checkpoint',
  ),
  (
    'teacher-plain-dir',
    [M2M, '--config.teachers.moco.checkpoint={FILES}/empty'],
    2,
    'without metadata.json',
  ),
  (
    'teacher-bad-metadata',
    [M2M, '--config.teachers.moco.checkpoint={FILES}/badmeta'],
    2,
    'metadata.json is unreadable',
  ),
  (
    'student-text-file',
    [M2M, '--config.student.checkpoint={FILES}/plain.txt'],
    2,
    'neither a converted directory',
  ),
  (
    'mae-from-moco',
    [MAE, '--config.model.checkpoint={MOCO_FILE}'],
    2,
    'a MoCo v3 checkpoint where an MAE one is needed',
  ),
  (
    'mae-without-decoder',
    [MAE, '--config.model.checkpoint={FILES}/encoder_only.pth'],
    2,
    'fresh_decoder=True',
  ),
  ('mae-mask', [MAE, '--config.mae.mask_ratio=1.5'], 2, 'mae.mask_ratio=1.5'),
  (
    'moco-temperature',
    [_config('mocov3_pretrain'), '--config.mocov3.temperature=0'],
    2,
    'mocov3.temperature=0',
  ),
  ('dmae-block', [_config('dmae'), '--config.dmae.student_block=5'], 2, 'dmae.student_block=5'),
  ('pool', [_config('finetune'), '--config.classifier.pool=max'], 2, "classifier.pool='max'"),
  (
    'smoothing',
    [_config('finetune'), '--config.classifier.label_smoothing=1.0'],
    2,
    'label_smoothing=1.0',
  ),
  ('probe-without-encoder', [_config('linear_probe')], 2, 'a linear probe needs the encoder'),
]

CONVERT_CASES = [
  ('convert-missing-src', ['--src', '{FILES}/nope.pth', '--dst', '{WD}/out'], 2, 'no such checkpoint file'),
  ('convert-dst-exists', ['--src', '{MOCO_FILE}', '--dst', '{WD}'], 2, 'already exists'),
  ('convert-garbage', ['--src', '{FILES}/garbage.pth', '--dst', '{WD}/out'], 2, 'not a readable PyTorch checkpoint'),
  ('convert-bad-metadata', ['--src', '{FILES}/badmeta', '--dst', '{WD}/out.pth'], 2, 'metadata.json'),
  ('convert-dst-under-file', ['--src', '{MOCO_FILE}', '--dst', '{FILES}/plain.txt/out'], 1, 'plain.txt'),
  ('convert-bad-mean', ['--src', '{MOCO_FILE}', '--dst', '{WD}/out', '--mean', '0.5,0.5'], 2, 'three comma-separated numbers'),
]  # fmt: skip


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp('bad_inputs')
  (d / 'plain.txt').write_text('not a checkpoint\n')
  (d / 'garbage.pth').write_bytes(b'PK\x03\x04 this is not a zip file at all')
  (d / 'empty').mkdir()
  (d / 'badmeta').mkdir()
  (d / 'badmeta' / 'metadata.json').write_text('{"format": "mae_pretrain"}')
  full = torch_format.load(teachers.path('mae_mu'))
  encoder = {k: v for k, v in full['model'].items() if not k.startswith(('decoder', 'mask_token'))}
  torch_format.save({'model': encoder}, str(d / 'encoder_only.pth'))
  from PIL import Image

  rng = np.random.RandomState(0)
  for folder, classes in (('oneclass', ['cat']), ('twenty', ['a', 'b'])):
    for c in classes:
      (d / folder / c).mkdir(parents=True)
      for i in range(10):
        pixels = rng.randint(0, 256, (40, 40, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(d / folder / c / f'{i}.png')
  return d


def _snapshot(root) -> dict[str, bytes]:
  out = {}
  for dirpath, _, names in os.walk(root):
    for n in names:
      p = os.path.join(dirpath, n)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


def _check(cmd: list[str], code: int, expected: str, wd, files) -> None:
  subst = {
    'WD': str(wd), 'FILES': str(files), 'MAE_FILE': teachers.path('mae_mu'),
    'MOCO_FILE': teachers.path('mocov3_mu'),
  }  # fmt: skip
  args = [a.format(**subst) for a in cmd if a is not None]
  before_wd, before_files = _snapshot(wd), _snapshot(files)
  p = subprocess.run(
    [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=str(files),
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )  # fmt: skip
  lines = [line for line in p.stderr.splitlines() if line.strip()]
  assert p.returncode == code, (p.returncode, p.stderr[-2000:])
  errors = [line for line in lines if line.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in p.stderr, p.stderr[-2000:]
  assert expected in errors[0], errors[0]
  assert _snapshot(wd) == before_wd, 'the workdir changed'
  assert _snapshot(files) == before_files, 'an input changed'


@pytest.fixture
def workdir(tmp_path):
  """A workdir that already holds something, which no refused command may touch."""
  wd = tmp_path / 'wd'
  wd.mkdir()
  (wd / 'config.json').write_text(json.dumps({'name': 'an earlier run'}))
  (wd / 'notes.txt').write_bytes(np.arange(256, dtype=np.uint8).tobytes())
  return wd


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_trainer_bad_input(case, files, workdir):
  _, cmd, code, expected = case
  if cmd[-1] is None:  # the case without --workdir
    full = [MAIN, *cmd[:-1]]
  elif any(a.startswith('--workdir=') for a in cmd):
    full = [MAIN, *cmd]
  else:
    full = [MAIN, *cmd, '--workdir={WD}']
  _check(full, code, expected, workdir, files)


@pytest.mark.parametrize('case', CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_converter_bad_input(case, files, workdir):
  _, cmd, code, expected = case
  _check(['-m', 'convert', *cmd], code, expected, workdir, files)


def test_a_folder_and_an_image_size_need_one_override_each(files, tmp_path):
  """folder:DIR with train/ and val/: --config.data.eval_split=val is enough, the evaluators
  follow it (they used to need --config.evaluators.knn.eval_split as well); and
  --config.data.image_size=48 resizes every view (it used to take three overrides)."""
  from PIL import Image

  root = tmp_path / 'imgs'
  rng = np.random.RandomState(0)
  for split, n in (('train', 12), ('val', 4)):
    for c in ('a', 'b'):
      (root / split / c).mkdir(parents=True)
      for i in range(n):
        Image.fromarray(rng.randint(0, 256, (40, 40, 3)).astype(np.uint8)).save(
          root / split / c / f'{i}.png'
        )
  p = subprocess.run(
    [sys.executable, MAIN, f'{M2M},teacher=random,student=random', f'--workdir={tmp_path / "wd"}',
     f'--config.data.name=folder:{root}', '--config.data.eval_split=val',
     '--config.data.image_size=48', '--config.batch_size=16', '--dry_run'],
    capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )  # fmt: skip
  assert p.returncode == 0, p.stderr[-2000:]
  assert 'dry run, nothing written' in p.stdout and not (tmp_path / 'wd').exists()


def test_at_least_forty_cases():
  assert len(CASES) + len(CONVERT_CASES) >= 40
