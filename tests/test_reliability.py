"""Reliability: kills and preemption, non-finite numerics, bad inputs, full disk."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma_jax import checkpointing, train
from moma_jax.models import pretrained, vit

from runlocal_helpers import FAST_COMPILE, M2M_PAPER, runlocal_config, train_one_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))


def _config(**overrides):
  steps = overrides.pop('num_train_steps', 40)
  checkpoint_every = overrides.pop('checkpoint_every', 10)
  return runlocal_config(M2M_PAPER, steps, checkpoint_every, 5, **overrides)


def test_fault_injection_kills_and_resumes_bit_identical(tmp_path):
  import fault_injection

  out = fault_injection.run(str(tmp_path), kills=2, steps=200, checkpoint_every=20, seed=1,
                            min_delay=0.0, max_delay=1.5)  # fmt: skip
  landed = [e for e in out['kills'] if not e['finished_before_kill']]
  assert [e['signal'] for e in landed] == ['SIGKILL', 'SIGTERM'], out['kills']
  sigterms = [e for e in landed if e['signal'] == 'SIGTERM']
  assert all(e['exit_code'] == 0 and e['saved_on_sigterm'] for e in sigterms), out['kills']
  assert out['identical'], out


def test_sigterm_saves_at_the_current_step(tmp_path):
  """In-process: a SIGTERM during training checkpoints the step in flight and returns cleanly."""
  c = _config(num_train_steps=200, checkpoint_every=1000)
  original = train.Preemption.reached
  calls = {'n': 0}

  def reached(self, step, ckpt):
    calls['n'] += 1
    if calls['n'] == 37:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(self, step, ckpt)

  train.Preemption.reached = reached
  try:
    out = train_one_device(c, str(tmp_path))
  finally:
    train.Preemption.reached = original
  assert out == {'step': 37, 'preempted': True}
  assert checkpointing.Checkpointer(str(tmp_path / 'checkpoints')).latest_step() == 37
  assert signal.getsignal(signal.SIGTERM) is not None  # handler restored


def test_sigterm_while_waiting_for_data_saves_and_returns(tmp_path, monkeypatch):
  """The input stream stalls after 3 batches (a hung read); a SIGTERM then still checkpoints the
  last step done and returns, instead of waiting forever inside tf.data."""
  import threading

  from moma_jax.data import pipeline

  real, stalled = pipeline.train_iterator, threading.Event()

  def stalling_iterator(*args, **kwargs):
    it = real(*args, **kwargs)

    class Stalls:  # the real stream for 3 batches, then a read that never returns
      n = 0
      next_index = property(lambda self: it.next_index)

      def __iter__(self):
        return self

      def __next__(self):
        if self.n == 3:
          stalled.set()
          threading.Event().wait()
        self.n += 1
        return next(it)

    return Stalls()

  monkeypatch.setattr(pipeline, 'train_iterator', stalling_iterator)
  threading.Thread(
    target=lambda: stalled.wait(300) and os.kill(os.getpid(), signal.SIGTERM), daemon=True
  ).start()
  out = train_one_device(_config(num_train_steps=50, checkpoint_every=1000), str(tmp_path))
  assert out['preempted'] and 1 <= out['step'] <= 3, out
  assert checkpointing.Checkpointer(str(tmp_path / 'checkpoints')).latest_step() == out['step']


def test_sigterm_during_compilation_saves_after_the_first_step(tmp_path, monkeypatch):
  """A SIGTERM that lands while the train step compiles (the handler runs when XLA returns) ends
  the run with a checkpoint after that step, which a resumed run continues from."""
  import threading
  import time

  real = train.jit_train_step

  def signalled_during_compile(*args, **kwargs):
    step = real(*args, **kwargs)

    def first_call(*a, **k):
      threading.Thread(
        target=lambda: (time.sleep(0.05), os.kill(os.getpid(), signal.SIGTERM)), daemon=True
      ).start()
      return step(*a, **k)  # compiles now (seconds): the signal arrives meanwhile

    calls = iter([first_call])
    return lambda *a, **k: next(calls, step)(*a, **k)

  monkeypatch.setattr(train, 'jit_train_step', signalled_during_compile)
  # A mask ratio no other test uses: a program not in the run's compilation cache (conftest.py).
  c = _config(num_train_steps=20, checkpoint_every=1000, **{'moma.mask_ratio': 0.8125})
  out = train_one_device(c, str(tmp_path))
  assert out == {'step': 1, 'preempted': True}
  assert checkpointing.Checkpointer(str(tmp_path / 'checkpoints')).latest_step() == 1
  monkeypatch.setattr(train, 'jit_train_step', real)
  c.num_train_steps = 20
  assert train_one_device(c, str(tmp_path))['step'] == 20


def test_non_finite_loss_stops_with_the_step_and_never_checkpoints_it(tmp_path):
  c = _config(checkpoint_every=1)
  c.optim.base_lr = 1e38
  with pytest.raises(
    train.NonFiniteError, match=r'non-finite (loss|grad_norm|param_norm) .* at step \d+'
  ):
    train_one_device(c, str(tmp_path))
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  for step in ckpt._manager.all_steps():
    import orbax.checkpoint as ocp

    state = ckpt._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
      'state'
    ]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state['params']))


def test_skip_nonfinite_counts_and_continues(tmp_path):
  c = _config(skip_nonfinite=True)
  c.optim.base_lr = 1e38
  out = train_one_device(c, str(tmp_path))
  assert out['step'] == 40 and out['skipped_steps'] > 0
  exported = pretrained.load_pretrained(str(tmp_path / 'export' / 'model')).params
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(exported))


def test_refuses_to_resume_a_different_experiment(tmp_path):
  train_one_device(_config(stop_at_step=10), str(tmp_path))
  with pytest.raises(ValueError, match=r'different experiment .*moma\.mask_ratio: 0\.9 -> 0\.75'):
    train_one_device(_config(**{'moma.mask_ratio': 0.75}), str(tmp_path))
  out = train_one_device(_config(num_train_steps=20), str(tmp_path))  # length may change
  assert out['step'] == 20
  forced = _config(**{'moma.mask_ratio': 0.75, 'num_train_steps': 30, 'force_resume': True})
  assert train_one_device(forced, str(tmp_path))['step'] == 30


@pytest.fixture()
def converted_teacher(tmp_path):
  kw = {**vit.decode_variant('mu/4').kwargs(), 'image_size': 32}
  variables = vit.ViT(**kw).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  d = str(tmp_path / 'teacher')
  pretrained.save_pretrained(
    d, {'encoder': pretrained.ComponentSpec('ViT', kw)}, {'encoder': variables}, {}
  )
  return d


def _params_files(d):
  root = os.path.join(d, 'params')
  return sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize(
  'damage', ['missing', 'pth_file', 'deleted_file', 'flipped_byte', 'wrong_size']
)
def test_bad_teacher_checkpoints_fail_fast_with_one_line(tmp_path, converted_teacher, damage):
  path = converted_teacher
  if damage == 'missing':
    path = str(tmp_path / 'nope')
  elif damage == 'pth_file':
    path = str(tmp_path / 'vit-b-300ep.pth.tar')
    open(path, 'wb').write(b'PK\x03\x04 whatever')
  elif damage == 'deleted_file':
    os.remove(_params_files(path)[-1])
  elif damage == 'flipped_byte':
    f = max(_params_files(path), key=os.path.getsize)
    data = bytearray(open(f, 'rb').read())
    data[len(data) // 2] ^= 0xFF
    open(f, 'wb').write(bytes(data))
  else:  # a teacher for 48 px images, student at 32 px
    kw = {**vit.decode_variant('mu/4').kwargs(), 'image_size': 48}
    v = vit.ViT(**kw).init(jax.random.key(0), jnp.zeros((1, 48, 48, 3)))
    path = str(tmp_path / 't48')
    pretrained.save_pretrained(
      path, {'encoder': pretrained.ComponentSpec('ViT', kw)}, {'encoder': v}, {}
    )
  workdir = tmp_path / 'run'
  r = subprocess.run(
    [sys.executable, 'main.py', '--config=configs/moco_to_mae.py:runlocal', f'--workdir={workdir}',
     f'--config.teachers.moco.checkpoint={path}'],
    cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': FAST_COMPILE}, capture_output=True,
    text=True, timeout=300,
  )  # fmt: skip
  assert r.returncode == 2, r.stderr[-2000:]
  err = [ln for ln in r.stderr.splitlines() if ln.startswith('error: ')]
  assert len(err) == 1, r.stderr[-2000:]
  expected = {
    'missing': 'no such file or directory',
    'pth_file': 'not a readable PyTorch checkpoint',  # files are converted on the fly
    'deleted_file': 'corrupt or truncated',
    'flipped_byte': 'corrupt or truncated',
    'wrong_size': 'a ViT for 48px images but data.image_size=32',  # validate.py, before JAX
  }[damage]
  assert expected in err[0], err[0]
  assert not workdir.exists()  # failed before writing anything


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
  """A checkpoint save that hits the file-size limit (EFBIG, as ENOSPC would) fails the run;
  the previous checkpoint stays complete, and a restart resumes from it to the same result."""
  # Random teacher and student: the file-size limit must hit the training checkpoint, not the
  # on-the-fly conversion of the shipped teachers.
  cmd = [sys.executable, 'main.py', '--config=configs/moco_to_mae.py:runlocal,teacher=random,student=random,recipe=paper',
         '--config.num_train_steps=20', '--config.checkpoint_every=10',
         '--config.evaluators.knn.before=False', '--config.evaluators.knn.at_end=False']  # fmt: skip
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': FAST_COMPILE}
  ref, run = tmp_path / 'ref', tmp_path / 'run'
  subprocess.run(cmd + [f'--workdir={ref}'], cwd=ROOT, env=env, check=True, capture_output=True)
  subprocess.run(
    cmd + [f'--workdir={run}', '--config.stop_at_step=10'],
    cwd=ROOT,
    env=env,
    check=True,
    capture_output=True,
  )
  ckpt10 = run / 'checkpoints' / '10'
  before = {p: open(p, 'rb').read() for p in map(str, ckpt10.rglob('*')) if os.path.isfile(p)}

  # Writes past a 20 KB file-size limit fail with EFBIG, as a full disk fails with ENOSPC.
  limited = f"trap '' XFSZ; ulimit -f 20; exec {' '.join(cmd)} --workdir={run}"
  r = subprocess.run(
    ['bash', '-c', limited], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert r.returncode == 1, r.stderr[-3000:]  # a runtime failure (2 is for bad usage)
  err = [ln for ln in r.stderr.splitlines() if ln.startswith('error: ')]
  assert len(err) == 1 and 'could not write the checkpoint of step 20' in err[0], r.stderr[-3000:]
  assert 'the checkpoint of step 10 is intact' in err[0]
  # No absl error records (orbax logged four tracebacks of the failed save, 336 lines), and none of
  # tensorstore's 200 'Event loop is closed' tracebacks (they once split the error line in CI).
  assert not re.findall(r'^E\d{4} ', r.stderr, re.M), r.stderr[-3000:]
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert not [p.name for p in (run / 'checkpoints').iterdir() if 'tmp' in p.name]
  assert checkpointing.Checkpointer(str(run / 'checkpoints')).latest_step() == 10
  after = {p: open(p, 'rb').read() for p in before}
  assert after == before  # the previous checkpoint is untouched
  subprocess.run(cmd + [f'--workdir={run}'], cwd=ROOT, env=env, check=True, capture_output=True)
  a = pretrained.load_pretrained(str(ref / 'export' / 'model')).params
  b = pretrained.load_pretrained(str(run / 'export' / 'model')).params
  jax.tree.map(np.testing.assert_array_equal, a, b)
  shutil.rmtree(tmp_path, ignore_errors=True)
