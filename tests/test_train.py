"""The trainer end to end: each setting learns, teachers stay frozen, resume == uninterrupted,
main.py runs, bad config fails fast."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import shipped
from moma_jax import train
from moma_jax.models.pretrained import load_pretrained

from runlocal_helpers import FAST_COMPILE, M2M_PAPER, runlocal_config, train_one_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name: str, **overrides):
  return runlocal_config(name, 60, 20, 10, **overrides)


def _history(workdir):
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    return json.load(f)['history']


@pytest.mark.parametrize('name', ['moco_to_mae', 'mae_to_moco', 'multi_teacher'])
def test_each_setting_reduces_the_loss(tmp_path, name):
  train_one_device(_config(name), str(tmp_path))
  hist = _history(tmp_path)
  first, last = hist[0]['loss'], np.mean([h['loss'] for h in hist[-2:]])
  assert last < 0.7 * first, (first, last)
  if name == 'multi_teacher':
    assert {'loss/mae', 'loss/moco'} <= set(hist[-1])
  loaded = load_pretrained(os.path.join(tmp_path, 'export', 'model'))
  assert loaded.model.width == 64 and os.path.exists(tmp_path / 'export' / 'model.pth')


def test_resume_matches_uninterrupted(tmp_path, caplog):
  # All 8 fake devices: the trainer's sharded save and restore end to end. With the closed-form
  # projector fit (moma.projector_fit_batches): done once at the start, never again on a resume.
  # (The fit on device-augmented batches: test_moma's prepare-stage test; here the device path
  # cost +55 s.)
  full, parts = tmp_path / 'full', tmp_path / 'parts'
  fit = {'moma.projector_fit_batches': 2}

  def config(**kw):
    return _config(M2M_PAPER, num_train_steps=40, **fit, **kw)

  caplog.set_level('INFO')
  train.train_and_evaluate(config(), str(full))
  assert caplog.text.count('prepared on 2 batches: fit_r2/moco') == 1
  out = train.train_and_evaluate(config(stop_at_step=20), str(parts))
  assert out['step'] == 20 and not os.path.exists(parts / 'export')
  train.train_and_evaluate(config(), str(parts))
  assert caplog.text.count('prepared on 2 batches') == 2
  a = load_pretrained(os.path.join(full, 'export', 'model')).params
  b = load_pretrained(os.path.join(parts, 'export', 'model')).params
  import jax

  jax.tree.map(np.testing.assert_array_equal, a, b)  # bit for bit
  # The history survives the resume (kept in the checkpoint), and a re-run of a finished run.
  losses = lambda d: [(h['step'], h['loss']) for h in _history(d)]  # noqa: E731
  assert losses(parts) == losses(full) and [s for s, _ in losses(full)] == [10, 20, 30, 40]
  train.train_and_evaluate(config(), str(parts))
  assert losses(parts) == losses(full)


def test_pretrained_teacher_and_student_from_converted_dirs(tmp_path):
  """Teachers / student given as converted checkpoint directories (the real-use path)."""
  import jax
  import jax.numpy as jnp

  from moma_jax.models import pretrained, vit

  dirs = {}
  for name, variant in (('teacher', 'mu/4'), ('student', 'mu/4')):
    m = vit.ViT(**vit.decode_variant(variant).kwargs(), image_size=32)
    params = m.init(jax.random.key(len(dirs)), jnp.zeros((1, 32, 32, 3)))
    spec = pretrained.ComponentSpec(
      'ViT', {**vit.decode_variant(variant).kwargs(), 'image_size': 32}
    )
    dirs[name] = str(tmp_path / name)
    pretrained.save_pretrained(dirs[name], {'encoder': spec}, {'encoder': params}, {})
  c = _config(M2M_PAPER, num_train_steps=20)
  c.teachers.moco.checkpoint = dirs['teacher']
  c.student.checkpoint = dirs['student']
  train_one_device(c, str(tmp_path / 'run'))
  before = load_pretrained(dirs['student']).params
  after = load_pretrained(str(tmp_path / 'run' / 'export' / 'model')).params
  diff = jax.tree.map(
    lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), before, after
  )
  assert max(jax.tree.leaves(diff)) > 0  # trained from the given student
  assert diff['params']['pos_embed'] == 0  # the fixed sin-cos table stays frozen


def _main(args, **kw):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': FAST_COMPILE}
  return subprocess.run(
    [sys.executable, 'main.py', *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw
  )


def test_trainer_starts_without_keras_or_scikit_learn(tmp_path):
  """Every command imports the trainer: TensorFlow comes without Keras 3 and scikit-learn (3 s of
  each start-up, moma_jax/data/tf_quiet.py), and clu's TensorBoard writer still writes scalars and,
  when asked, hparams (which loads them then)."""
  code = f"""
import sys
from moma_jax import train
loaded = lambda: [m for m in ('keras', 'sklearn') if m in sys.modules]
assert loaded() == [], loaded()
w = train.metric_writers.create_default_writer({str(tmp_path)!r}, just_logging=False)
w.write_scalars(1, {{'loss': 0.5}})
w.flush()
assert loaded() == [], loaded()
w.write_hparams({{'lr': 0.1}})
w.flush()
assert 'keras' in sys.modules
"""
  r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                     env={**os.environ, 'PYTHONPATH': ROOT})  # fmt: skip
  assert r.returncode == 0, r.stderr[-2000:]
  events = [f for f in os.listdir(tmp_path) if f.startswith('events.out.tfevents')]
  assert events and all(os.path.getsize(tmp_path / f) > 0 for f in events), os.listdir(tmp_path)


def test_main_runlocal_end_to_end(tmp_path):
  """README command 1: a short, readable log (a progress line at every log_every, no library
  chatter) and a final summary block with the student before / after and its baselines."""
  r = _main(['--config=configs/moco_to_mae.py:runlocal', f'--workdir={tmp_path}'], timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  # The shipped tiny teacher and student, converted on the fly from their PyTorch files.
  assert 'RANDOMLY INITIALISED' not in r.stderr and 'mocov3_mu4_digits.pth.tar' in r.stderr
  log = (r.stderr + r.stdout).splitlines()
  assert len(log) < 40, '\n'.join(log)
  steps = [
    int(m.group(1))
    for line in log
    if (m := re.search(r'step (\d+)/600 +loss [\d.]+ +\d+ img/s +ETA', line))
  ]
  assert steps == list(range(50, 601, 50)), steps
  # The minute after the last step says what it is doing (the export, the final evaluation).
  for said in ('exported the trained model to', 'final evaluation (knn) of the trained model and',
               'final evaluation (knn): '):  # fmt: skip
    assert any(said in line for line in log), '\n'.join(log)
  block = r.stdout[r.stdout.index('moco_to_mae: 600/600 steps') :]
  pct = r' +\d+\.\d%'
  for pattern in (  # k-NN and linear-probe columns
    r'k-NN \(k 20, T 0\.07\) and linear-probe top-1 on digits/test',
    rf'student \(before -> after\){pct} ->{pct}{pct} ->{pct}$',
    rf'teacher moco{pct}{pct}$', rf'random-init student{pct}{pct}$', rf'raw pixels{pct}{pct}$',
    r'chance +10\.0% +10\.0%$',
  ):  # fmt: skip
    assert re.search(pattern, block, re.M), block
  metrics = json.load(open(tmp_path / 'final_metrics.json'))
  final = metrics['final']
  assert final['step'] == 600 and final['summary'] == block.strip().splitlines()
  for key in (
    'knn/model/top1',
    'knn/model_before/top1',
    'knn/raw_pixels/top1',
    'knn/teacher_moco/top1',
    'knn/random_init/top1',
  ):
    assert 0 <= final[key] <= 1
    assert 0 <= final[key.replace('/top1', '/linear')] <= 1
  # The small-scale recipe's claim (configs/moco_to_mae.py): the student ends above its start in
  # both probes (3 seeds: +4.5 k-NN, +4.8 linear, each several seed deviations).
  for probe in ('top1', 'linear'):
    assert final[f'knn/model/{probe}'] > final[f'knn/model_before/{probe}'], block
  # ... and an evaluator that is not the trainer's agrees: the exported model.pth (and the shipped
  # student it started from) read by the independent PyTorch ViT, scikit-learn k-NN and logistic
  # regression (scripts/outside_eval.py), within a point of the trainer's numbers.
  sys.path.insert(0, os.path.join(ROOT, 'scripts'))
  import outside_eval

  outside = {
    'model': outside_eval.evaluate(str(tmp_path / 'export' / 'model.pth')),
    'model_before': outside_eval.evaluate(shipped.path('mae_mu')),
  }
  for name, (knn, linear) in outside.items():
    assert abs(knn - 100 * final[f'knn/{name}/top1']) <= 1.0, (name, knn, block)
    assert abs(linear - 100 * final[f'knn/{name}/linear']) <= 1.0, (name, linear, block)
  assert (
    outside['model'][0] > outside['model_before'][0]
    and outside['model'][1] > outside['model_before'][1]
  )
  assert [h['step'] for h in metrics['history']] == list(range(50, 601, 50))
  assert os.path.exists(tmp_path / 'config.json')
  # TensorBoard images every 200 steps: teacher view | student sees (masked), 4 examples.
  events = [str(tmp_path / f) for f in os.listdir(tmp_path) if f.startswith('events.out.tfevents')]
  images = _event_images(events)
  assert sorted(images) == [200, 400, 600], sorted(images)
  for count, height, width in images.values():
    assert (count, height, width) == (4, 32, 32 * 3 + 2 * 2)


def _event_images(files: list[str]) -> dict[int, tuple[int, int, int]]:
  """step -> (images, height, width) of the 'images' summaries in TensorBoard event files."""
  import tensorflow as tf

  out = {}
  for f in files:
    for e in tf.compat.v1.train.summary_iterator(f):
      for v in e.summary.value:
        if v.tag == 'images':
          t = tf.make_ndarray(v.tensor)  # [width, height, encoded png...]
          first = tf.io.decode_png(t[2]).numpy()
          out[e.step] = (len(t) - 2, *first.shape[:2])
          assert (int(t[0]), int(t[1])) == (first.shape[1], first.shape[0])
  return out


def test_main_rejects_misspelt_key_and_bad_batch(tmp_path):
  r = _main(
    [
      '--config=configs/moco_to_mae.py:runlocal',
      f'--workdir={tmp_path}',
      '--config.moma.mask_ratoi=0.8',
    ]
  )
  assert r.returncode != 0 and 'mask_ratoi' in r.stderr
  r = _main(['--config=configs/moco_to_mae.py:runlocal,typo', f'--workdir={tmp_path}'])
  assert r.returncode != 0 and "unknown config argument 'typo'" in r.stderr
  env_8 = {'XLA_FLAGS': f'--xla_force_host_platform_device_count=8 {FAST_COMPILE}'}
  r = subprocess.run(
    [sys.executable, 'main.py', '--config=configs/moco_to_mae.py:runlocal', f'--workdir={tmp_path}', '--config.batch_size=60'],
    cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env_8}, capture_output=True, text=True,
  )  # fmt: skip
  assert r.returncode == 2 and 'not divisible by the 8 data-parallel devices' in r.stderr
  assert not os.listdir(tmp_path)  # failed before writing anything
