"""DINO: loss, head, schedules and optimizer against PyTorch references written from the official
code; multi-crop; ViT and ResNet backbones; 8 devices == 1; DINO checkpoints as MOMA teachers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import multicrop_helpers
import numpy as np
import optax
import pytest
import torch

from configs import common, dino_pretrain, moco_to_mae
from convert.convert import convert_checkpoint, export_checkpoint
from moma_jax import builders, ema, validate
from moma_jax.models import heads, resnet, vit
from moma_jax.models.pretrained import load_pretrained
from moma_jax.objectives import dino, registry

import torch_reference as ref
import torch_resnet as tr


def test_dino_loss_and_center_match_torch_over_epochs():
  k, b, ncrops = 32, 4, 6
  loss_fn = tr.DINOLoss(k, ncrops, 0.04, 0.07, 3, 10)
  center = jnp.zeros((1, k))
  rng = np.random.RandomState(0)
  for epoch in range(4):  # warm-up epochs 0..2, then the final temperature
    s = rng.randn(ncrops * b, k).astype(np.float32) * 3
    t = rng.randn(2 * b, k).astype(np.float32) * 3
    expected = float(loss_fn(torch.from_numpy(s), torch.from_numpy(t), epoch))
    temp = dino.teacher_temperature(epoch * 5 + 4, 5, 0.04, 0.07, 3)  # last step of the epoch
    assert float(temp) == pytest.approx(loss_fn.teacher_temp_schedule[epoch], rel=1e-6)
    loss, center = dino.dino_loss(jnp.split(s, ncrops), jnp.split(t, 2), center, temp)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(center, loss_fn.center.numpy(), rtol=1e-5, atol=1e-7)


def test_sinkhorn_centering_matches_dinov2():
  """centering='sinkhorn': DINOv2's Sinkhorn-Knopp teacher targets, and the loss built on them."""
  k, b, ncrops, temp = 32, 4, 6, 0.07
  rng = np.random.RandomState(1)
  s = rng.randn(ncrops * b, k).astype(np.float32) * 3
  t = rng.randn(2 * b, k).astype(np.float32) * 0.3  # cosine-like logits, as the head's
  q = tr.sinkhorn_knopp_teacher(torch.from_numpy(t), temp).numpy()
  np.testing.assert_allclose(dino.sinkhorn_knopp(jnp.asarray(t), temp), q, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-5)  # each image a distribution
  center = jnp.full((1, k), 5.0)  # not read by Sinkhorn-Knopp
  loss, _ = dino.dino_loss(jnp.split(s, ncrops), jnp.split(t, 2), center, temp,
                           centering='sinkhorn')  # fmt: skip
  logp = torch.log_softmax(torch.from_numpy(s) / 0.1, dim=-1).chunk(ncrops)
  qs = torch.from_numpy(q).chunk(2)
  pairs = [(iq, v) for iq in range(2) for v in range(ncrops) if v != iq]
  expected = sum(float(torch.sum(-qs[iq] * logp[v], dim=-1).mean()) for iq, v in pairs)
  np.testing.assert_allclose(float(loss), expected / len(pairs), rtol=1e-5)
  with pytest.raises(ValueError, match='centering must be one of'):
    dino.dino_loss(jnp.split(s, ncrops), jnp.split(t, 2), center, temp, centering='sk')
  # Logits spanning 400 T (a MOKD search head at T 0.02): DINOv2's float32 exp underflows for
  # whole prototypes (0 / 0); the log-domain version matches the same algorithm in float64.
  wide = (rng.randn(2 * b, k) * 3).astype(np.float32)
  q64 = np.exp(wide.astype(np.float64) / 0.02).T
  q64 /= q64.sum()
  for _ in range(3):
    q64 = q64 / q64.sum(1, keepdims=True) / k
    q64 = q64 / q64.sum(0, keepdims=True) / (2 * b)
  with np.errstate(invalid='ignore'):
    assert np.isnan(tr.sinkhorn_knopp_teacher(torch.from_numpy(wide), 0.02).numpy()).any()
  np.testing.assert_allclose(dino.sinkhorn_knopp(jnp.asarray(wide), 0.02), (q64 * 2 * b).T,
                             rtol=1e-4, atol=1e-30)  # fmt: skip


def test_schedules_match_dino_cosine_scheduler():
  ref_lr = tr.cosine_scheduler(5e-4, 1e-6, 42, 14)  # DINO's: 6 epochs of 7 steps, 2 warm-up
  lr = dino.cosine_schedule(5e-4, 1e-6, 42, 14)
  np.testing.assert_allclose([float(lr(i)) for i in range(42)], ref_lr, rtol=1e-5, atol=1e-10)
  ref_wd = tr.cosine_scheduler(0.04, 0.4, 42)
  wd = dino.cosine_schedule(0.04, 0.4, 42)
  np.testing.assert_allclose([float(wd(i)) for i in range(42)], ref_wd, rtol=1e-5)


def test_dino_head_matches_torch():
  head = heads.DinoHead(out_dim=40, hidden_dim=24, bottleneck_dim=8, num_layers=3)
  variables = head.init(jax.random.key(0), jnp.zeros((1, 16)))
  variables = jax.tree.map(lambda v: v * 1.7, variables)  # weight_g != 1, so g is exercised
  t_head = tr.DINOHead(16, 40, 3, 24, 8)
  tr.load_flax(t_head, variables)
  x = np.random.RandomState(0).randn(5, 16).astype(np.float32)
  with torch.no_grad():
    expected = t_head(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(head.apply(variables, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('n_in,n_out', [(14, 6), (8, 4), (7, 3), (4, 2)])
def test_position_interpolation_matches_torch(n_in, n_out):
  pos = np.random.RandomState(n_in).randn(1, n_in * n_in, 5).astype(np.float32)
  expected = tr.interpolate_grid(torch.from_numpy(pos), n_out).numpy()
  np.testing.assert_allclose(heads.resample_pos_grid(jnp.asarray(pos), n_out), expected, atol=1e-5)


def test_dino_optimizer_matches_torch_adamw_and_sgd():
  """Two param groups (decay / no decay), per-tensor clipping, last layer frozen in step 0."""
  rng = np.random.RandomState(0)
  p0 = {'w': rng.randn(3, 4).astype(np.float32), 'bias': rng.randn(4).astype(np.float32),
        'last_layer': {'weight_v': rng.randn(2, 4).astype(np.float32)}}  # fmt: skip
  grads = [jax.tree.map(lambda x: rng.randn(*x.shape).astype(np.float32) * 5, p0) for _ in range(3)]
  lr = lambda s: 0.1 * (s + 1)  # noqa: E731
  wd = lambda s: 0.05 * (s + 1)  # noqa: E731
  for kind in ('adamw', 'sgd'):
    tx = dino.dino_optimizer(kind, lr, wd, clip=3.0, freeze_last_layer_steps=1)
    params, state = jax.tree.map(jnp.asarray, p0), None
    state = tx.init(params)
    tp = {k: torch.nn.Parameter(torch.from_numpy(np.array(v))) for k, v in
          (('w', p0['w']), ('bias', p0['bias']), ('v', p0['last_layer']['weight_v']))}  # fmt: skip
    groups = [{'params': [tp['w'], tp['v']]}, {'params': [tp['bias']], 'weight_decay': 0.0}]
    opt = (
      torch.optim.AdamW(groups) if kind == 'adamw' else torch.optim.SGD(groups, lr=0, momentum=0.9)
    )
    for step, g in enumerate(grads):
      upd, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
      params = optax.apply_updates(params, upd)
      for i, group in enumerate(opt.param_groups):
        group['lr'] = lr(step)
        if i == 0:
          group['weight_decay'] = wd(step)
      opt.zero_grad()
      for name, key in (('w', ('w',)), ('bias', ('bias',)), ('v', ('last_layer', 'weight_v'))):
        gv = g[key[0]] if len(key) == 1 else g[key[0]][key[1]]
        tp[name].grad = torch.from_numpy(np.array(gv))
      for p in tp.values():  # DINO's clip_gradients
        norm = p.grad.norm(2)
        coef = 3.0 / (norm + 1e-6)
        if coef < 1:
          p.grad.mul_(coef)
      if step < 1:  # cancel_gradients_last_layer
        tp['v'].grad = None
      opt.step()
      for name, key in (('w', ('w',)), ('bias', ('bias',)), ('v', ('last_layer', 'weight_v'))):
        mine = params[key[0]] if len(key) == 1 else params[key[0]][key[1]]
        np.testing.assert_allclose(mine, tp[name].detach().numpy(), rtol=2e-5, atol=2e-6,
                                   err_msg=f'{kind} step {step} {name}')  # fmt: skip


def _tiny_dino(backbone, num_local=2, total=10):
  return dino.Dino(
    backbone, heads.DinoHead(32, 16, 8), total_steps=total, steps_per_epoch=2, num_local=num_local,
    warmup_teacher_temp_epochs=2, global_size=16, local_size=8,
  )  # fmt: skip


def _vit16():
  return vit.ViT(**vit.decode_variant('pico/4').kwargs(), image_size=16)


@pytest.mark.parametrize('kind', ['vit', 'resnet'])
def test_dino_loss_is_the_official_formula_on_the_models(kind):
  """Dino.loss == DINOLoss over (head(backbone(crop))) with crops of two sizes, step 0."""
  backbone = _vit16() if kind == 'vit' else resnet.ResNet(**resnet.decode_variant('resnet_pico'))
  obj = _tiny_dino(backbone)
  params, extra = jax.jit(obj.init)(jax.random.key(0))  # eager Flax init: 2x slower
  batch = multicrop_helpers.batch(4, 0)
  loss, (metrics, new) = obj.loss(params, extra, {}, batch, jax.random.key(1))
  x_g = obj.input_norm(jnp.concatenate([batch['global1'], batch['global2']]))
  x_l = obj.input_norm(jnp.concatenate([batch['local1'], batch['local2']]))
  bn = extra.get('student_bn', {})
  f_g, _, bn = dino.encode(backbone, params['backbone'], bn, x_g, train=True)
  f_l, _, _ = dino.encode(backbone, params['backbone'], bn, x_l, train=True)
  s = jnp.concatenate([obj.head.apply({'params': params['head']}, f) for f in (f_g, f_l)])
  t_feat, _, _ = dino.encode(backbone, params['backbone'], extra.get('teacher_bn', {}), x_g,
                             train=True)  # fmt: skip
  t = obj.head.apply({'params': params['head']}, t_feat)  # step 0: teacher == student
  loss_fn = tr.DINOLoss(32, 4, 0.04, 0.07, 2, 5)
  expected = loss_fn(torch.from_numpy(np.array(s)), torch.from_numpy(np.array(t)), 0)
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
  np.testing.assert_allclose(new['center'], loss_fn.center.numpy(), rtol=1e-5, atol=1e-7)
  assert int(new['step']) == 1 and float(metrics['teacher_temp']) == pytest.approx(0.04)


@pytest.mark.parametrize('kind', ['vit', 'resnet'])
def test_dino_8_devices_equal_1(kind):
  """Center, BatchNorm statistics and the loss mean span the global batch, whatever the mesh."""
  make = _vit16 if kind == 'vit' else lambda: resnet.ResNet(**resnet.decode_variant('resnet_pico'))
  ref_l, ref_p, ref_e = multicrop_helpers.train_steps(
    _tiny_dino(make()), {'data': 1}, jax.devices()[:1], 0.05
  )
  for axes in ({'data': 8}, {'data': 1, 'fsdp': 8}) if kind == 'vit' else ({'data': 2, 'fsdp': 4},):
    losses, p, e = multicrop_helpers.train_steps(_tiny_dino(make()), axes, jax.devices(), 0.05)
    np.testing.assert_allclose(losses, ref_l, rtol=1e-5)
    close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)  # noqa: E731
    jax.tree.map(close, p, ref_p)
    jax.tree.map(close, e, ref_e)


def test_dino_training_follows_main_dino_step_by_step(tmp_path):
  """Six training steps of Dino.loss + dino_optimizer (EMA teacher, center, multi-crop with
  resized position embeddings, AdamW groups, per-tensor clipping, last layer frozen in epoch 1,
  weight_g frozen, per-step schedules, per-epoch teacher temperature) == main_dino.py's loop in
  PyTorch (torch_resnet.DinoTraining) from the same converted initialisation, on the same crops."""
  torch.manual_seed(0)
  k, steps, spe, peak = 32, 6, 2, 2e-3
  student = tr.MultiCropWrapper(tr.DinoViT(4, 32, 2, 2, grid=4), tr.DINOHead(32, k, 3, 16, 8))
  teacher = tr.MultiCropWrapper(tr.DinoViT(4, 32, 2, 2, grid=4), tr.DINOHead(32, k, 3, 16, 8))
  state = student.state_dict()
  torch.save({'teacher': state, 'student': state}, str(tmp_path / 'init.pth'))
  convert_checkpoint(str(tmp_path / 'init.pth'), str(tmp_path / 'init'), num_heads=2)
  loaded = load_pretrained(str(tmp_path / 'init'))
  lr = tr.cosine_scheduler(peak, 1e-5, steps, 2)
  wd = tr.cosine_scheduler(0.04, 0.4, steps)
  mom = tr.cosine_scheduler(0.9, 1.0, steps)
  ref_run = tr.DinoTraining(
    student, teacher, tr.DINOLoss(k, 4, 0.04, 0.07, 2, 4), lr, wd, mom, spe
  )  # fmt: skip
  obj = dino.Dino(
    loaded.model, heads.DinoHead(k, 16, 8), total_steps=steps, steps_per_epoch=spe, num_local=2,
    warmup_teacher_temp_epochs=2, base_momentum=0.9, global_size=16, local_size=8,
  )  # fmt: skip
  params = {'backbone': loaded.params['params'], 'head': loaded.heads['head'].variables['params']}
  extra = {'teacher': params, 'center': jnp.zeros((1, k)), 'step': jnp.zeros((), jnp.int32)}
  tx = dino.dino_optimizer(
    'adamw', dino.cosine_schedule(peak, 1e-5, steps, 2), dino.cosine_schedule(0.04, 0.4, steps),
    clip=3.0, freeze_last_layer_steps=spe, frozen=obj.frozen_pattern,
  )  # fmt: skip
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, extra, batch):
    grads, (metrics, extra) = jax.grad(obj.loss, has_aux=True)(
      params, extra, {}, batch, jax.random.key(0)
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, extra, metrics['loss']

  for i in range(steps):
    batch = multicrop_helpers.batch(8, i)
    crops = [torch.from_numpy(np.array(obj.input_norm(jnp.asarray(batch[n])))).permute(0, 3, 1, 2)
             for n in ('global1', 'global2', 'local1', 'local2')]  # fmt: skip
    expected, _ = ref_run.step(i, crops)
    params, opt_state, extra, loss = step(params, opt_state, extra, batch)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, err_msg=f'step {i}')
  np.testing.assert_allclose(extra['center'], ref_run.loss_fn.center.numpy(), rtol=1e-4, atol=1e-6)
  # Dino.loss applies the EMA of step t at the start of step t + 1 (main_dino.py at the end of
  # step t): the teacher after six steps is the stored one plus that pending update.
  mine = {
    'student': params,
    'teacher': ema.ema_update(extra['teacher'], params, obj.momentum(extra['step'])),
  }
  for name, model in (('student', student), ('teacher', teacher)):
    torch.save({'teacher': model.state_dict()}, str(tmp_path / f'{name}.pth'))
    convert_checkpoint(str(tmp_path / f'{name}.pth'), str(tmp_path / name), num_heads=2)
    theirs = load_pretrained(str(tmp_path / name))
    theirs = {'backbone': theirs.params['params'], 'head': theirs.heads['head'].variables['params']}
    jax.tree_util.tree_map_with_path(
      lambda path, a, b, name=name: _close_but_key_bias(a, b, f'{name} {jax.tree_util.keystr(path)}'),
      mine[name], theirs,
    )  # fmt: skip


def _close_but_key_bias(a, b, where, key_bound=2e-4):
  """Trained parameters agree to round-off; the attention's key bias within ``key_bound`` (~the
  sum of this test's learning rates: see ref.key_bias_apart)."""
  (a, b), key = ref.key_bias_apart(where, a, b)
  if key is not None:
    np.testing.assert_allclose(*key, atol=key_bound, err_msg=where)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=where)


def _dino_torch_vit(depth=2, dim=32, heads_=2):
  model = ref.VisionTransformer(img_size=16, patch=4, dim=dim, depth=depth, heads=heads_)
  model.pos_embed.requires_grad_(True)  # DINO learns its position embeddings
  return model


def test_dino_vit_checkpoint_converts_and_serves_as_moma_teacher(tmp_path):
  """Official DINO training checkpoint ('teacher' / 'student', 'module.' / 'backbone.') ->
  converted ViT + head equal to PyTorch's, usable as teachers.dino.checkpoint=..."""
  torch.manual_seed(0)
  backbone = _dino_torch_vit()
  head = tr.DINOHead(32, 48, 3, 24, 8)
  teacher = {f'backbone.{k}': v for k, v in backbone.state_dict().items()}
  teacher.update({f'head.{k}': v for k, v in head.state_dict().items()})
  student = {f'module.{k}': v.clone() + 1 for k, v in teacher.items()}
  src = str(tmp_path / 'checkpoint.pth')
  torch.save({'student': student, 'teacher': teacher, 'epoch': 3,
              'dino_loss': {'center': torch.zeros(1, 48)}}, src)  # fmt: skip
  meta = convert_checkpoint(src, str(tmp_path / 'conv'), num_heads=2)
  assert meta['format'] == 'dino' and meta['source']['checkpoint_key'] == 'teacher'
  loaded = load_pretrained(str(tmp_path / 'conv'))
  x = np.random.RandomState(0).randn(3, 16, 16, 3).astype(np.float32)
  tokens, _ = loaded.model.apply(loaded.params, x)
  with torch.no_grad():
    t_tokens, _ = backbone.forward_encoder(torch.from_numpy(x).permute(0, 3, 1, 2))
    t_logits = head(t_tokens[:, 0]).numpy()
  np.testing.assert_allclose(tokens, t_tokens.numpy(), rtol=1e-5, atol=1e-5)
  h = loaded.heads['head']
  np.testing.assert_allclose(h.module.apply(h.variables, tokens[:, 0]), t_logits, atol=1e-5)
  # The student is there too, behind --checkpoint-key.
  convert_checkpoint(src, str(tmp_path / 'stu'), num_heads=2, checkpoint_key='student')
  stu = load_pretrained(str(tmp_path / 'stu'))
  np.testing.assert_allclose(
    stu.params['params']['cls_token'], loaded.params['params']['cls_token'] + 1
  )
  # ... and DINO's layout back out.
  export_checkpoint(str(tmp_path / 'conv'), str(tmp_path / 'back.pth'), fmt='dino')
  back = torch.load(str(tmp_path / 'back.pth'), weights_only=True)
  for k, v in teacher.items():
    np.testing.assert_array_equal(back['teacher'][k].numpy(), v.numpy(), err_msg=k)
  # A MOMA teacher, straight from the official file.
  c = moco_to_mae.get_config('runlocal')
  c.teachers = {'dino': common.teacher(src, student_view='masked')}
  c.data.image_size = 16
  c.data.views = {k: dict(v, size=16) for k, v in c.data.views.items()}
  c.student.checkpoint = ''
  c.student.variant = 'pico/4'
  with pytest.raises(ValueError, match='heads'):  # width 32: the number of heads is not guessable
    builders.build_moma(c)
  convert_checkpoint(src, str(tmp_path / 'conv2'), num_heads=2)
  c.teachers.dino.checkpoint = str(tmp_path / 'conv2')
  objective, frozen, _, notes = builders.build_moma(c)
  assert objective.teachers['dino'].model.depth == 2 and 'teacher dino' in notes[1]
  np.testing.assert_array_equal(
    frozen['dino']['params']['cls_token'], loaded.params['params']['cls_token']
  )


def test_bad_inputs_fail_in_one_line_before_compiling(tmp_path):
  c = dino_pretrain.get_config('runlocal')
  c.dino.centering = 'sk'
  with pytest.raises(validate.ConfigError, match=r"^dino.centering='sk': 'center' \(DINO\) or"):
    validate.validate(c, None)
  with pytest.raises(ValueError, match=r"^recipe='sinkhorn': 'dino' \(the default\) or, with runl"):
    dino_pretrain.get_config('recipe=sinkhorn')  # a runlocal recipe only
  sk = dino_pretrain.get_config('runlocal,recipe=sinkhorn')
  validate.validate(sk, None)
  assert sk.dino.centering == 'sinkhorn' and sorted(sk.data.views) == ['global1', 'global2']
  c.dino.centering = 'sinkhorn'
  views = c.data.views
  views.local2.size = 12
  with pytest.raises(ValueError, match=r'mismatched local crop sizes'):
    registry.build_objective(c, 10, 100)
  views.local2.size = 16
  for v in ('local1', 'local2', 'local3', 'local4'):
    views[v].size = 18
  with pytest.raises(ValueError, match='local crop size 18 is not divisible by the patch size 4'):
    registry.build_objective(c, 10, 100)
  # A ResNet checkpoint where a ViT is expected (a MOMA teacher).
  torch.save(tr.ResNet(tr.BasicBlock, [1, 1, 1, 1], 0, 8, True).state_dict(), tmp_path / 'r.pth')
  m = moco_to_mae.get_config('runlocal')
  m.teachers = {'t': common.teacher(str(tmp_path / 'r.pth'))}
  with pytest.raises(ValueError, match=r'holds a ResNet \(resnet_pico\), but a ViT is needed'):
    builders.build_moma(m)


def test_drop_path_on_the_student_only():
  """The student ViT gets drop path (its own dropout key); the teacher never does."""
  obj = _tiny_dino(_vit16().clone(drop_path=0.5))
  params, extra = jax.jit(obj.init)(jax.random.key(0))  # eager Flax init: 2x slower
  batch = multicrop_helpers.batch(2, 0)
  losses = [
    float(jax.jit(obj.loss)(params, extra, {}, batch, jax.random.key(k))[0]) for k in (1, 2)
  ]
  assert losses[0] != losses[1]  # different drop-path masks
  feats = obj.features(params, extra, {}, batch['global1'])
  assert np.isfinite(np.asarray(feats)).all()


def test_collapse_metrics_name_both_collapses():
  """Uniform teacher output (every image gets ln K) and one shared prototype (batch entropy 0)
  against a direct NumPy computation; a healthy one-hot-per-image output has both signals apart."""
  k, b = 16, 8
  center = jnp.zeros((1, k))
  temp = jnp.float32(0.04)
  same = dino.collapse_metrics(jnp.zeros((b, k)), center, temp)  # every logit equal: uniform
  np.testing.assert_allclose(same['teacher_entropy'], np.log(k), rtol=1e-6)
  np.testing.assert_allclose(same['teacher_batch_entropy'], np.log(k), rtol=1e-6)
  one = jnp.tile(jnp.eye(k)[:1] * 10.0, (b, 1))  # every image on prototype 0
  m = dino.collapse_metrics(one, center, temp)
  assert m['teacher_entropy'] < 1e-3 and m['teacher_batch_entropy'] < 1e-3
  healthy = dino.collapse_metrics(jnp.eye(k)[:b] * 10.0, center, temp)  # one prototype each
  assert healthy['teacher_entropy'] < 1e-3
  np.testing.assert_allclose(healthy['teacher_batch_entropy'], np.log(b), rtol=1e-4)
  logits = np.random.RandomState(0).randn(b, k).astype(np.float32)
  z = logits / 0.04
  logp = z - z.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  p = np.exp(logp)
  got = dino.collapse_metrics(jnp.asarray(logits), center, temp)
  np.testing.assert_allclose(got['teacher_entropy'], -(p * logp).sum(1).mean(), rtol=1e-4)
  q = p.mean(0)
  np.testing.assert_allclose(got['teacher_batch_entropy'], -(q * np.log(q)).sum(), rtol=1e-4)


def test_collapse_warning_names_the_collapse_and_stays_quiet_when_healthy():
  k = 256
  uniform = {'teacher_entropy': 0.99 * np.log(k), 'teacher_batch_entropy': np.log(k)}
  assert 'uniform output' in dino.collapse_warning(uniform, k)
  one = {'teacher_entropy': 0.01, 'teacher_batch_entropy': 0.02}
  assert 'the same prototype' in dino.collapse_warning(one, k)
  healthy = {'teacher_entropy': 2.0, 'teacher_batch_entropy': 4.5}
  assert dino.collapse_warning(healthy, k) is None
  mokd = {f'{m}/{s}': v for s, d in (('cnn', healthy), ('vit', uniform)) for m, v in d.items()}
  line = dino.collapse_warning(mokd, k, ('cnn', 'vit'))
  assert 'the vit teacher gives every image the uniform output' in line and 'cnn' not in line


def test_trainer_logs_the_entropies_and_warns_once_when_the_teacher_collapses(tmp_path, caplog):
  """A teacher at temperature 100 gives every image the uniform output from the first step: the
  step lines carry both entropies and one warning names the step (issue 32)."""
  import logging

  from runlocal_helpers import runlocal_config, train_one_device

  c = runlocal_config('dino_pretrain', 4, 1000, 2)
  c.dino.update(teacher_temp=100.0, warmup_teacher_temp=100.0)
  with caplog.at_level(logging.INFO):
    train_one_device(c, str(tmp_path))
  steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith('step ')]
  assert any('H_entropy' in m and 'H_batch_entropy' in m for m in steps), steps
  warnings = [m for m in steps if 'collapsed' in m]
  assert len(warnings) == 1 and warnings[0].startswith('step 2: the teacher gives every image'), (
    warnings
  )
