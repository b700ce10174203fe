"""Evaluation protocols: layer decay, k-NN, fine-tuning, linear probe, exact evaluation counts."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from convert import layouts
from moma_jax import optim, sharding, train
from moma_jax.evaluators.classification import ClassificationEvaluator
from moma_jax.evaluators.knn import knn_predict
from moma_jax.models import pretrained, vit


def _mae_layer_id(torch_name: str, num_layers: int) -> int:
  """MAE's util/lr_decay.py get_layer_id_for_vit, on PyTorch parameter names."""
  if torch_name in ('cls_token', 'pos_embed'):
    return 0
  if torch_name.startswith('patch_embed'):
    return 0
  if torch_name.startswith('blocks'):
    return int(torch_name.split('.')[1]) + 1
  return num_layers


def test_layer_decay_matches_mae_rule_for_every_vit_b_parameter():
  model = vit.ViT(**vit.decode_variant('B/16').kwargs(), num_classes=1000, pool='gap')
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  params = {'model': shapes['params']}
  scales = optim.layer_decay_scales(params, 12, 0.65)
  # Map every Flax parameter to its PyTorch name (the converter's mapping) and apply MAE's rule.
  flat_scales = traverse_util.flatten_dict(scales['model'], sep='/')
  zeros = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), shapes)
  torch_names = list(layouts.flax_to_torch(zeros))
  assert len(torch_names) == len(flat_scales) == 152
  for name in torch_names:
    *mods, leaf = name.split('.')
    path = '/'.join(re.sub(r'^(blocks)\.(\d+)$', r'\1_\2', m) for m in ['.'.join(mods)]).replace(
      'blocks.', 'blocks_'
    )
    leaf = {'weight': 'kernel' if 'norm' not in name else 'scale'}.get(leaf, leaf)
    key = f'{path}/{leaf}' if path else leaf
    key = key.replace('.', '/')
    expected = 0.65 ** (12 + 1 - _mae_layer_id(name, 12 + 1))
    assert flat_scales[key] == pytest.approx(expected), (name, key)


def test_knn_matches_brute_force():
  rng = np.random.RandomState(0)
  train_f, test_f = rng.randn(300, 16), rng.randn(50, 16)
  train_y = rng.randint(0, 7, 300)
  scores = knn_predict(train_f, train_y, test_f, num_classes=7, k=20, temperature=0.07, chunk=16)
  # Brute force: full sort, explicit loop over neighbours.
  tn = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
  qn = test_f / np.linalg.norm(test_f, axis=1, keepdims=True)
  for i in range(50):
    sims = tn @ qn[i]
    order = np.argsort(-sims)[:20]
    expected = np.zeros(7)
    for j in order:
      expected[train_y[j]] += np.exp(sims[j] / 0.07)
    np.testing.assert_allclose(scores[i], expected, rtol=1e-4)


def test_classification_eval_counts_every_example_once_on_8_devices():
  mesh = sharding.make_mesh({'data': 8})
  ev = ClassificationEvaluator(
    dataset='digits', split='test', image_size=32, batch_size=64, mesh=mesh,
    data_axes=('data',), resize_ratio=1.0,
  )  # fmt: skip
  # A fixed "classifier": predicts from the mean pixel (any deterministic function will do).
  w = jax.random.normal(jax.random.key(0), (3, 10))

  def predict(args, images):
    return images.astype(jnp.float32).mean(axis=(1, 2)) @ args

  results = dict(ev.run(predict, w))
  from moma_jax.data import embedded

  x, y = embedded.load('test')  # 720 examples: 11 full batches of 64 and a padded 12th
  logits = np.asarray(x, np.float32).mean(axis=(1, 2)) @ np.asarray(w)
  assert results['eval/num_examples'] == 720
  assert results['eval/top1'] == pytest.approx((logits.argmax(1) == y).mean(), abs=1e-9)
  top5 = np.argsort(-logits, axis=1)[:, :5]
  assert results['eval/top5'] == pytest.approx((top5 == y[:, None]).any(1).mean(), abs=1e-9)


def test_finetune_runlocal_learns(tmp_path):
  from configs import finetune

  c = finetune.get_config('runlocal')
  c.num_train_steps = c.checkpoint_every = 200  # a third of the recipe: 58.5% measured (600: 85.6%)
  # All 8 fake devices (not runlocal_helpers.train_one_device): this run and the probe's below were
  # 10% slower on one (their frozen forward passes spread over both cores as 8 device programs).
  out = train.train_and_evaluate(c, str(tmp_path))
  # chance is 10%; on 720 test examples its standard deviation is 1.1%
  assert out['eval/top1'] > 0.35, out
  assert os.path.exists(tmp_path / 'export' / 'model.pth')
  # The standalone k-NN command on the exported model.
  import contextlib
  import io

  from moma_jax.evaluators import knn

  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    knn.main(['--checkpoint', str(tmp_path / 'export' / 'model'), '--dataset', 'digits',
              '--eval_split', 'test', '--resize_ratio', '1'])  # fmt: skip
  value = float(re.search(r'knn/top1: ([\d.]+)%', buf.getvalue()).group(1))
  assert 10.0 < value <= 100.0


def test_linear_probe_learns_and_leaves_the_encoder_untouched(tmp_path):
  from configs import linear_probe

  enc = vit.ViT(**vit.decode_variant('mu/4').kwargs(), image_size=32)
  variables = enc.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
  spec = pretrained.ComponentSpec('ViT', {**vit.decode_variant('mu/4').kwargs(), 'image_size': 32})
  pretrained.save_pretrained(str(tmp_path / 'enc'), {'encoder': spec}, {'encoder': variables}, {})
  c = linear_probe.get_config(f'runlocal,checkpoint={tmp_path / "enc"},pool=gap')
  captured = {}
  original = train.jit_train_step

  def spy(*args):
    step = original(*args)

    def wrapped(state, frozen, batch, rng):
      captured['frozen'] = frozen
      return step(state, frozen, batch, rng)

    return wrapped

  train.jit_train_step = spy
  try:
    out = train.train_and_evaluate(c, str(tmp_path / 'run'))
  finally:
    train.jit_train_step = original
  # Logistic regression on these random features tops out at ~17% (chance 10%, sd 1.1% on 720).
  assert out['eval/top1'] > 0.125, out
  after = sharding.to_host(captured['frozen']['encoder'])
  jax.tree.map(np.testing.assert_array_equal, after, jax.tree.map(np.asarray, variables))
  assert not os.path.exists(tmp_path / 'run' / 'export')  # a probe exports nothing


def test_probe_needs_a_checkpoint():
  from configs import linear_probe

  c = linear_probe.get_config('runlocal')
  with pytest.raises(ValueError, match='linear probe needs classifier.checkpoint'):
    train.train_and_evaluate(c, '/nonexistent/never/written')
