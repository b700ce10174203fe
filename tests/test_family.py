"""MAE, MoCo v3, DMAE, RC-MAE as objectives of the one trainer."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.__main__ import main as convert_cli
from moma_jax import ema, sharding, train
from moma_jax.data import augment, device, photometric
from moma_jax.data.mixing import normalize
from moma_jax.models import vit
from moma_jax.models.heads import MlpHead
from moma_jax.models.pretrained import load_pretrained
from moma_jax.objectives.dmae import Dmae, l2_normalize
from moma_jax.objectives.mae import Mae, mae_decoder_for, masked_mean, pixel_targets
from moma_jax.objectives.mocov3 import MocoV3, infonce
from moma_jax.objectives.rc_mae import RcMae

from runlocal_helpers import runlocal_config, train_one_device


def _vit(variant='mu/4'):
  return vit.ViT(**vit.decode_variant(variant).kwargs(), image_size=32)


def _images(n=8, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)


def test_infonce_known_answer():
  q = k = jnp.eye(4)  # orthonormal: positives score 1 / T, negatives 0
  t = 0.2
  expected = np.log(1 + 3 * np.exp(-1 / t)) * 2 * t
  np.testing.assert_allclose(infonce(q, k, t), expected, rtol=2e-5)
  np.testing.assert_allclose(infonce(3 * q, 0.5 * k, t), expected, rtol=2e-5)  # scale-free


def test_norm_pix_target_and_masked_mean():
  x = np.random.RandomState(0).randn(2, 8, 8, 3).astype(np.float32)
  t = np.asarray(pixel_targets(x, 4))
  patches = x.reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 48)
  ref = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(
    patches.var(-1, ddof=1, keepdims=True) + 1e-6
  )
  np.testing.assert_allclose(t, ref, rtol=1e-5, atol=1e-5)
  per_patch = np.arange(8, dtype=np.float32).reshape(2, 4)
  keep = np.array([[0, 2], [3, 1]])
  np.testing.assert_allclose(masked_mean(per_patch, keep), (1 + 3 + 4 + 6) / 4)


def test_mae_loss_against_numpy():
  enc = _vit()
  mae = Mae(enc, mae_decoder_for(enc, 32, 1, 4))
  params, extra = mae.init(jax.random.key(0))
  batch = {'image': _images()}
  rng = jax.random.key(3)
  loss, _ = mae.loss(params, extra, {}, batch, rng)
  k_mask, _ = jax.random.split(rng)
  keep = np.asarray(mae.keep_idx(k_mask, 8))
  x = normalize(batch['image'])
  pred, _, _ = mae.reconstruct(params, x, keep)
  tgt = np.asarray(pixel_targets(x, 4))
  err = ((np.asarray(pred) - tgt) ** 2).mean(-1)
  masked = np.ones((8, 64), bool)
  masked[np.arange(8)[:, None], keep] = False
  assert masked.sum() == 8 * (64 - 16)  # 75% of 64 patches masked
  np.testing.assert_allclose(loss, err[masked].mean(), rtol=1e-5)


def test_dmae_normalised_l1_against_numpy():
  enc, teacher = _vit(), _vit('mu/4')
  d = Dmae(enc, mae_decoder_for(enc, 32, 1, 4), teacher=teacher, teacher_block=2, student_block=1)
  params, extra = d.init(jax.random.key(0))
  frozen = {'teacher': teacher.init(jax.random.key(9), jnp.zeros((1, 32, 32, 3)))}
  batch, rng = {'image': _images()}, jax.random.key(4)
  _, (metrics, _) = d.loss(params, extra, frozen, batch, rng)
  k_mask, _ = jax.random.split(rng)
  keep = d.keep_idx(k_mask, 8)
  x = normalize(batch['image'])
  _, t_aux = teacher.apply(frozen['teacher'], x, keep)  # the teacher sees the same visible tokens
  _, s_aux = enc.apply({'params': params['encoder']}, x, keep)
  s = np.asarray(s_aux['block_0'][:, 1:]) @ np.asarray(params['projector']['kernel']) + np.asarray(
    params['projector']['bias']
  )
  t = np.asarray(t_aux['block_1'][:, 1:])
  norm = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
  np.testing.assert_allclose(metrics['loss/distill'], np.abs(norm(s) - norm(t)).mean(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(l2_normalize(s)), norm(s), rtol=1e-5)


def test_rc_mae_consistency_against_numpy_and_ema():
  enc = _vit()
  rc = RcMae(enc, mae_decoder_for(enc, 32, 1, 4), momentum=0.9)
  params, extra = rc.init(jax.random.key(0))
  extra = {'ema': jax.tree.map(lambda p: p + 0.01, extra['ema']), 'step': extra['step']}
  batch, rng = {'image': _images()}, jax.random.key(5)
  _, (metrics, new) = rc.loss(params, extra, {}, batch, rng)
  teacher = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, extra['ema'], params)  # EMA formula
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new['ema'], teacher
  )
  k_mask, _ = jax.random.split(rng)
  keep = np.asarray(rc.keep_idx(k_mask, 8))
  x = normalize(batch['image'])
  s, _, _ = rc.reconstruct(params, x, keep)
  t, _, _ = rc.reconstruct(teacher, x, keep)
  err = ((np.asarray(s) - np.asarray(t)) ** 2).mean(-1)
  masked = np.ones((8, 64), bool)
  masked[np.arange(8)[:, None], keep] = False
  np.testing.assert_allclose(metrics['loss/consistency'], err[masked].mean(), rtol=1e-4)
  assert int(new['step']) == 1


def test_ema_and_momentum_schedule():
  a, b = {'w': jnp.ones(3)}, {'w': jnp.zeros(3)}
  np.testing.assert_allclose(ema.ema_update(a, b, 0.99)['w'], 0.99)
  assert float(ema.cosine_momentum(0, 100, 0.99)) == pytest.approx(0.99)
  assert float(ema.cosine_momentum(100, 100, 0.99)) == pytest.approx(1.0)
  assert float(ema.cosine_momentum(50, 100, 0.99)) == pytest.approx(0.995)


def _moco():
  enc = _vit()
  return MocoV3(enc, MlpHead(3, 32, 16), MlpHead(2, 32, 16, last_bn=False), total_steps=10)


def _moco_steps(mesh_axes, devices, steps=2):
  obj = _moco()
  mesh = sharding.make_mesh(mesh_axes, devices)
  import optax

  # SGD: updates proportional to gradients, so the comparison checks the gradients themselves
  # (Adam would turn round-off-level gradients into lr-sized, sign-random updates).
  tx = optax.sgd(0.05)
  state, ssh, _ = train.create_state(obj, tx, mesh, [('.*', 'fsdp')], jax.random.key(0))
  # The views' photometric augmentation on device, in the step (data.photometric='device'): a
  # function of each example's seed, so the sharded steps must still equal the 1-device one.
  views = {
    'view1': augment.moco_strong_view(32, blur_prob=1.0, solarize_prob=0.0),
    'view2': augment.moco_strong_view(32, blur_prob=0.1, solarize_prob=0.2),
  }
  step = train.jit_train_step(obj, tx, lambda s: 1e-4, mesh, ssh, sharding.replicated(mesh),
                              augment=photometric.make_batch_fn(views))  # fmt: skip
  bsh = device.batch_sharding(mesh, sharding.data_axes(mesh))
  losses = []
  for i in range(steps):
    seeds = np.random.RandomState(i).randint(0, 2**31, (16, 2)).astype(np.uint32)
    batch = {'view1': _images(16, i), 'view2': _images(16, i + 100), photometric.AUG_SEED: seeds}
    batch = device.make_global(batch, bsh)
    state, m = step(state, {}, batch, jax.random.key(1))
    losses.append(float(m['loss']))
  return losses, sharding.to_host(state.params), sharding.to_host(state.extra)


def test_mocov3_global_batch_semantics_8_devices_equal_1():
  """InfoNCE negatives and BatchNorm statistics span the global batch, whatever the sharding."""
  ref_l, ref_p, ref_e = _moco_steps({'data': 1}, jax.devices()[:1])
  for axes in ({'data': 8}, {'data': 2, 'fsdp': 4}):
    losses, p, e = _moco_steps(axes, jax.devices())
    np.testing.assert_allclose(losses, ref_l, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), p, ref_p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), e, ref_e)
  # A per-device (local) InfoNCE would differ: the global one is not an average of 8 local ones.
  q = jax.random.normal(jax.random.key(2), (16, 16))
  k = q + 0.1 * jax.random.normal(jax.random.key(3), (16, 16))
  local = np.mean([infonce(q[i : i + 2], k[i : i + 2], 0.2) for i in range(0, 16, 2)])
  assert abs(float(infonce(q, k, 0.2)) - local) > 1e-3


def _config(name, steps=60):
  return runlocal_config(name, steps, 1000, 10)


@pytest.mark.parametrize('name', ['mae_pretrain', 'mocov3_pretrain', 'dmae', 'rc_mae'])
def test_runlocal_learns(tmp_path, name):
  config = _config(name)
  if name == 'mocov3_pretrain':  # the accelerators' path on CPU: photometric ops in the step
    config.data.photometric = 'device'
    # digits_m: its photo backgrounds make instances easy to tell apart, so 60 steps of the
    # instance task show a clear drop (on the runlocal digits: 3.46 -> 3.26, chance 3.31).
    config.data.name = 'digits_m'
  train_one_device(config, str(tmp_path))
  hist = json.load(open(tmp_path / 'final_metrics.json'))['history']
  first, last = hist[0]['loss'], np.mean([h['loss'] for h in hist[-2:]])
  if name == 'mocov3_pretrain':
    # Symmetric InfoNCE scaled by 2T (MoCo v3): 4T ln(B - 1) when nothing is learned. Measured at
    # 60 steps: 3.38 -> 3.09 (chance 3.31); the check is 0.1 below chance and 5% below the start.
    chance = 4 * config.mocov3.temperature * np.log(config.batch_size - 1)
    assert last < min(0.95 * first, chance - 0.1), (first, last, chance)
  else:
    assert last < 0.9 * first, (first, last)


@pytest.mark.parametrize('name,components', [
  ('mae_pretrain', {'decoder'}),
  ('mocov3_pretrain', {'projector', 'predictor', 'momentum_encoder', 'momentum_projector'}),
])  # fmt: skip
def test_export_converts_back_to_identical_params(tmp_path, name, components):
  train_one_device(_config(name, steps=5), str(tmp_path / 'run'))
  exported = load_pretrained(str(tmp_path / 'run' / 'export' / 'model'))
  assert set(exported.heads) == components
  back_dir = str(tmp_path / 'back')
  assert (
    convert_cli(
      ['--src', str(tmp_path / 'run' / 'export' / 'model.pth'), '--dst', back_dir, '--momentum']
    )
    == 0
  )
  back = load_pretrained(back_dir)
  assert back.metadata['format'] == ('mocov3' if name == 'mocov3_pretrain' else 'mae_full')
  jax.tree.map(np.testing.assert_array_equal, back.params, exported.params)
  for comp in components:
    jax.tree.map(
      np.testing.assert_array_equal, back.heads[comp].variables, exported.heads[comp].variables
    )
  assert os.path.exists(tmp_path / 'run' / 'export' / 'model.pth')
