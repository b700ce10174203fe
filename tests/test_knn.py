"""k-NN on sharded features: the on-device search against the NumPy reference, feature pooling,
the evaluator end to end on the embedded digits, and the standalone command."""

from __future__ import annotations

import contextlib
import io
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from moma_jax import builders, sharding
from moma_jax.data import embedded
from moma_jax.evaluators import knn
from moma_jax.models import pretrained, vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PICO = os.path.join(ROOT, 'teachers', 'mocov3_pico4_digits.pth.tar')


def _mesh(axes):
  mesh = sharding.make_mesh(axes)
  return mesh, sharding.data_axes(mesh)


@pytest.mark.parametrize(
  'axes,batch,block',
  [
    ({'data': 8}, 64, 16384),  # one block per device
    ({'data': 8}, 64, 7),  # blocks that do not divide the rows: padded bank
    ({'data': 2, 'fsdp': 4}, 40, 3),
    ({'data': 1, 'fsdp': 8}, None, 5),
  ],
)
def test_on_device_knn_equals_the_numpy_reference(axes, batch, block):
  mesh, data_axes = _mesh(axes)
  rng = np.random.RandomState(0)
  train_f = rng.randn(300, 16).astype(np.float32)
  train_y = rng.randint(0, 7, 300)
  test_f = rng.randn(48, 16).astype(np.float32)
  # Invalid rows that would be every query's nearest neighbours: they must never vote.
  valid = np.ones(300, bool)
  valid[::5] = False
  train_f[::5][: len(test_f)] = 10 * test_f[: len(train_f[::5])]
  expected = knn.knn_predict(train_f[valid], train_y[valid], test_f, num_classes=7)
  bank = knn.bank_from_arrays(
    train_f, train_y, mesh=mesh, data_axes=data_axes, valid=valid, batch_size=batch,
    bank_block=block,
  )  # fmt: skip
  assert bank.num_examples == valid.sum()
  assert bank.features.sharding.spec == PartitionSpec(data_axes, None)  # rows split over N
  shard_rows = {s.data.shape[0] for s in bank.features.addressable_shards}
  assert shard_rows == {bank.features.shape[0] // 8}
  scores = knn.knn_scores(bank, jnp.asarray(test_f), num_classes=7, k=20, temperature=0.07)
  assert scores.sharding.spec == PartitionSpec(data_axes, None)
  scores = np.asarray(scores)
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5 * expected.max())
  np.testing.assert_array_equal(scores.argmax(1), expected.argmax(1))
  # How alike the valid rows are (the invalid ones, scaled queries, must not count): NumPy
  f = train_f[valid] + 0.5  # a shared direction, so that the answer is far from 0
  bank = knn.bank_from_arrays(
    np.where(valid[:, None], train_f + 0.5, train_f), train_y, mesh=mesh, data_axes=data_axes,
    valid=valid, batch_size=batch, bank_block=block,
  )  # fmt: skip
  m = f.mean(0)
  cos = (f @ m / np.linalg.norm(f, axis=1) / np.linalg.norm(m)).mean()
  assert 0.2 < cos < 0.9
  np.testing.assert_allclose(knn.cosine_to_mean(bank), cos, rtol=1e-5)


def test_fewer_bank_rows_than_k():
  mesh, data_axes = _mesh({'data': 8})
  rng = np.random.RandomState(1)
  train_f, train_y, test_f = rng.randn(5, 4), rng.randint(0, 3, 5), rng.randn(8, 4)
  bank = knn.bank_from_arrays(train_f, train_y, mesh=mesh, data_axes=data_axes)
  scores = np.asarray(knn.knn_scores(bank, jnp.asarray(test_f, jnp.float32), num_classes=3))
  expected = knn.knn_predict(train_f, train_y, test_f, num_classes=3, k=20)
  np.testing.assert_allclose(scores, expected, rtol=1e-5)


def _tiny_encoder(pool='cls', num_classes=0):
  model = vit.ViT(
    **vit.decode_variant('pico/4').kwargs(), image_size=32, pool=pool, num_classes=num_classes
  )
  return model, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_feature_pooling_and_input_statistics():
  model, variables = _tiny_encoder()
  images = jax.random.randint(jax.random.key(1), (2, 32, 32, 3), 0, 256).astype(jnp.uint8)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)
  x = (images / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
  tokens, _ = model.apply(variables, x)
  cls = knn.encoder_features(model, pool='cls', mean=mean, std=std)(variables, images)
  avg = knn.encoder_features(model, pool='mean', mean=mean, std=std)(variables, images)
  both = knn.encoder_features(model, pool='cls+mean', mean=mean, std=std)(variables, images)
  np.testing.assert_allclose(cls, tokens[:, 0], atol=1e-5)
  np.testing.assert_allclose(avg, tokens[:, 1:].mean(1), atol=1e-5)
  np.testing.assert_allclose(both, jnp.concatenate([cls, avg], -1), atol=1e-6)
  assert both.shape == (2, 64) and both.dtype == jnp.float32
  # cls_features is the 'cls' pooling; ImageNet statistics by default.
  np.testing.assert_array_equal(knn.cls_features(model, mean=mean, std=std)(variables, images), cls)
  assert not np.allclose(knn.cls_features(model)(variables, images), cls)
  # A global-pooling classifier gives its pre-logits whatever the pooling.
  gap, gvars = _tiny_encoder('gap', num_classes=3)
  _, aux = gap.apply(gvars, (images / 255.0 - jnp.asarray(mean)) / jnp.asarray(std))
  pre = knn.encoder_features(gap, pool='cls+mean', mean=mean, std=std)(gvars, images)
  np.testing.assert_allclose(pre, aux['pre_logits'], atol=1e-6)
  with pytest.raises(ValueError, match='features must be one of'):
    knn.encoder_features(model, pool='max')


def test_evaluator_equals_the_reference_on_digits_8_devices():
  """Every train example in the bank exactly once, padding never a neighbour, every test example
  counted once (1077 train / 720 test do not divide the batch of 64)."""
  mesh, data_axes = _mesh({'data': 2, 'fsdp': 4})
  ev = knn.KnnEvaluator(  # the linear probe: tests/test_linear_probe.py
    dataset='digits', train_split='train', eval_split='test', image_size=32, batch_size=64,
    mesh=mesh, data_axes=data_axes, resize_ratio=1.0, bank_block=40, linear=False,
  )  # fmt: skip
  w = jax.random.normal(jax.random.key(0), (32 * 32 * 3, 24)) / 50.0

  def features(w, images):  # a fixed random projection of the pixels
    return jnp.tanh(images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0 @ w)

  (name, top1), = ev.run(features, w, 'knn/x')  # fmt: skip
  xtr, ytr = embedded.load('train')
  xte, yte = embedded.load('test')
  ftr, fte = (np.asarray(features(w, jnp.asarray(x))) for x in (xtr, xte))
  scores = knn.knn_predict(ftr, ytr, fte, num_classes=10)
  assert name == 'knn/x/top1'
  assert top1 == pytest.approx((scores.argmax(1) == yte).mean(), abs=1e-9)


def _run_cli(args):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = knn.main(args)
  return code, out.getvalue(), err.getvalue()


def _percent(text, label):
  return float(re.search(rf'{label}: ([\d.]+)%', text).group(1))


def _evaluator(ckpt_model, **kw):
  return knn.KnnEvaluator(
    dataset='digits', train_split='train', eval_split='test', image_size=ckpt_model.image_size,
    batch_size=256, mesh=sharding.make_mesh({'data': -1}), data_axes=('data',), resize_ratio=1.0,
    **kw,
  )  # fmt: skip


def test_command_on_a_pytorch_checkpoint_equals_the_trainer_evaluator():
  # 1,024 of the 5,748 train images in the bank and the probes (the same code as all of them; the
  # raw-pixel logistic regression at 3,072 dims is most of this test's time).
  code, out, err = _run_cli(['--checkpoint', PICO, '--dataset', 'digits', '--max_train', '1024'])
  assert code == 0, err
  assert out.count('\n') == 1 and 'digits train -> test' in out and 'cls+mean' in out
  loaded = builders.load_checkpoint(PICO)
  model = loaded.model
  params = {'params': {k: v for k, v in loaded.params['params'].items() if k != 'head'}}
  ev = _evaluator(model, max_train_examples=1024)
  fn = knn.encoder_features(model, pool='cls+mean')  # no statistics recorded: ImageNet's
  result = dict(ev.run(fn, params))
  pixel_ev = _evaluator(model, linear=False, max_train_examples=1024)
  (_, pixels), = pixel_ev.run(train_pixel_features, None)  # fmt: skip
  assert _percent(out, 'knn/top1') == pytest.approx(100 * result['knn/top1'], abs=0.006)
  assert _percent(out, 'linear/top1') == pytest.approx(100 * result['knn/linear'], abs=0.006)
  assert _percent(out, 'raw pixels') == pytest.approx(100 * pixels, abs=0.006)
  assert re.search(r'raw pixels: [\d.]+% \(linear [\d.]+%\)', out), out
  assert _percent(out, 'chance') == 10.0


def train_pixel_features(_, images):  # what train.py's raw_pixels evaluator uses
  return images.reshape(images.shape[0], -1).astype(jnp.float32)


def test_command_reads_the_input_statistics_of_a_converted_directory(tmp_path):
  model, variables = _tiny_encoder()
  spec = pretrained.ComponentSpec(
    'ViT', {**vit.decode_variant('pico/4').kwargs(), 'image_size': 32}
  )
  stats = {'mean': [0.3, 0.3, 0.3], 'std': [0.1, 0.2, 0.3]}
  pretrained.save_pretrained(
    str(tmp_path / 'enc'), {'encoder': spec}, {'encoder': variables}, stats
  )
  code, out, err = _run_cli(
    ['--checkpoint', str(tmp_path / 'enc'), '--dataset', 'digits', '--features', 'mean',
     '--no-baselines', '--max_train', '512', '--spread', '--random_init', '3']
  )  # fmt: skip
  assert code == 0, err
  assert 'raw pixels' not in out
  ev = _evaluator(model, max_train_examples=512, spread=True)
  fn = knn.encoder_features(model, pool='mean', **stats)
  result = dict(ev.run(fn, variables))
  assert _percent(out, 'knn/top1') == pytest.approx(100 * result['knn/top1'], abs=0.006)
  assert _percent(out, 'linear/top1') == pytest.approx(100 * result['knn/linear'], abs=0.006)
  cos = float(re.search(r'cosine to the mean: ([\d.]+)', out).group(1))
  assert cos == pytest.approx(result['knn/cos_to_mean'], abs=1e-4) and 0 < cos < 1
  # the floor: the same architecture at random init, seed 3
  init = model.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
  floor = dict(ev.run(fn, init))
  tail = out.split('random init (seed 3): ')[1]
  assert _percent(tail, 'knn/top1') == pytest.approx(100 * floor['knn/top1'], abs=0.006)
  assert _percent(tail, 'linear/top1') == pytest.approx(100 * floor['knn/linear'], abs=0.006)


@pytest.mark.parametrize(
  'args,message',
  [
    (['--checkpoint', '/nonexistent/ckpt', '--dataset', 'digits'], 'nonexistent'),
    (['--checkpoint', PICO, '--dataset', 'no_such_dataset_xyz'], 'no_such_dataset_xyz'),
    (['--checkpoint', PICO, '--dataset', 'digits', '--eval_split', 'validation'], 'validation'),
    (['--checkpoint', PICO, '--dataset', 'digits', '--batch_size', '100'], 'batch_size 100'),
  ],
)
def test_command_bad_input_is_one_line(args, message):
  code, out, err = _run_cli(args)
  assert code == 2 and out == ''
  assert err.count('\n') == 1 and err.startswith('error: ') and message in err, err
  assert 'Traceback' not in err


def test_default_splits():
  assert knn.default_splits('digits') == ('train', 'test', 1.0)
  assert knn.default_splits('no_such_dataset_xyz')[:2] == ('train', 'validation')
