"""The production path on an object store: training, preemption + resume, export and the converter
against gs://, served by a GCS emulator on loopback (no network needed).

Why an emulator stands for gs://: the code under test is exactly what runs on Cloud TPU. Orbax's
arrays go through tensorstore's GCS driver (TENSORSTORE_GCS_HTTP_URL points it at the emulator),
every other file through etils.epath's GCS backend (gcsfs, which honours STORAGE_EMULATOR_HOST;
EPATH_USE_TF=false picks it over TensorFlow's GCS client, which has no endpoint override). Only
TensorBoard's event files go through TensorFlow's own GCS client, which no emulator can stand in
for: the runs here pass --config.tensorboard=False.

Everything is checked from outside, through the emulator's JSON API, not through the code under
test; and the resumed run on gs:// is compared with an uninterrupted local run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('gcp_storage_emulator')

from convert import torch_format  # noqa: E402
from moma_jax.experiments import teachers  # noqa: E402

from gcs_emulator import BUCKET, download, emulator_env, gcs_emulator, list_objects, upload  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def gcs():
  with gcs_emulator() as (url, _):
    yield url


def _objects(url: str, prefix: str) -> dict[str, int]:
  return list_objects(url, BUCKET, prefix)


def _download(url: str, name: str, dst: str) -> str:
  return download(url, BUCKET, name, dst)


def _run(args: list[str], env: dict[str, str], cwd: str) -> subprocess.CompletedProcess:
  p = subprocess.run(
    [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
  )
  assert p.returncode == 0, p.stderr[-3000:]
  return p


def test_train_preempt_resume_export_on_gcs(gcs, tmp_path):
  env = emulator_env(gcs)
  # The teacher comes from the bucket too (an official-format PyTorch file, converted on the fly).
  teacher = upload(gcs, BUCKET, teachers.path('mocov3_mu'), 'teachers/mocov3_mu4_digits.pth.tar')
  workdir = f'gs://{BUCKET}/runs/m2m'
  common = [
    os.path.join(ROOT, 'main.py'),
    f'--config={os.path.join(ROOT, "configs", "moco_to_mae.py")}:runlocal',
    f'--config.teachers.moco.checkpoint={teacher}',
    '--config.num_train_steps=4',
    '--config.checkpoint_every=2',
    '--config.log_every=2',
    '--config.evaluators.knn.before=False',  # no k-NN: the files and parameters are compared
    '--config.evaluators.knn.at_end=False',
    '--config.tensorboard=False',
  ]
  cwd = str(tmp_path)  # outside the repository: nothing may land in $PWD/gs:/...
  _run([*common, f'--workdir={workdir}', '--config.stop_at_step=2'], env, cwd)
  names = _objects(gcs, 'runs/m2m/')
  assert 'runs/m2m/config.json' in names
  assert any(n.startswith('runs/m2m/checkpoints/2/') for n in names), sorted(names)
  assert not any('export' in n for n in names)

  resumed = _run([*common, f'--workdir={workdir}'], env, cwd)
  assert 'resumed from step 2' in resumed.stderr
  names = _objects(gcs, 'runs/m2m/')
  for required in ('export/model/metadata.json', 'export/model.pth', 'final_metrics.json'):
    assert f'runs/m2m/{required}' in names, sorted(names)
  assert any(n.startswith('runs/m2m/checkpoints/4/') for n in names)
  assert not os.path.exists(os.path.join(cwd, 'gs:')), 'a gs:// path was written to local disk'

  # The same run uninterrupted, on local disk: the resumed export must be the same model.
  local = tmp_path / 'local'
  _run([*common, f'--workdir={local}'], env, cwd)
  remote = torch_format.load(_download(gcs, 'runs/m2m/export/model.pth', str(tmp_path / 'r.pth')))
  reference = torch_format.load(str(local / 'export' / 'model.pth'))
  assert set(remote['model']) == set(reference['model'])
  for k, v in reference['model'].items():
    np.testing.assert_allclose(remote['model'][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  meta = json.loads(
    open(_download(gcs, 'runs/m2m/export/model/metadata.json', str(tmp_path / 'm.json'))).read()
  )
  assert meta['steps'] == 4

  # The converter alone, gs:// -> gs:// and back to a PyTorch file on gs://.
  conv = _run(
    ['-m', 'convert', '--src', f'{workdir}/export/model.pth', '--dst', f'gs://{BUCKET}/conv/student'],
    env, ROOT,
  )  # fmt: skip
  assert 'wrote' in conv.stdout
  _run(
    ['-m', 'convert', '--src', f'gs://{BUCKET}/conv/student', '--dst', f'gs://{BUCKET}/conv/back.pth'],
    env, ROOT,
  )  # fmt: skip
  back = torch_format.load(_download(gcs, 'conv/back.pth', str(tmp_path / 'back.pth')))
  for k, v in remote['model'].items():
    np.testing.assert_array_equal(back['model'][k], v, err_msg=k)
