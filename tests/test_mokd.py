"""MOKD: search heads, the full loss against PyTorch written from the official code, per-model
optimizers, 8 devices == 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import multicrop_helpers
import numpy as np
import optax
import pytest
import torch

from configs import mokd as mokd_config
from moma_jax import validate
from moma_jax.models import heads, resnet, vit
from moma_jax.objectives import dino, mokd, registry

import torch_reference as ref
import torch_resnet as tr


@pytest.mark.parametrize('cnn', [True, False])
@pytest.mark.parametrize('side', [4, 2])  # the training grid, and a local crop's (resized pos)
def test_transhead_with_query_matches_torch(cnn, side):
  head = heads.TransHead(out_dim=24, grid=4, width=16, depth=2, num_heads=2,
                         in_channels=12 if cnn else 0)  # fmt: skip
  x = np.random.RandomState(side).randn(3, side, side, 12 if cnn else 16).astype(np.float32)
  if not cnn:
    x = x.reshape(3, side * side, 16)
  q = np.random.RandomState(9).randn(3, 16).astype(np.float32)
  variables = head.init(jax.random.key(0), x)
  variables = jax.tree.map(lambda v: v * 1.3, variables)  # weight_g != 1
  t_head = tr.THead(24, 4, 16, 2, 2, in_chans=12 if cnn else 0)
  tr.load_flax(t_head, variables)
  t_x = torch.from_numpy(x).permute(0, 3, 1, 2) if cnn else torch.from_numpy(x)
  with torch.no_grad():
    for query in (None, q):
      out, pooled = head.apply(variables, x, query)
      t_out, t_pooled = t_head(t_x, None if query is None else torch.from_numpy(query))
      np.testing.assert_allclose(out, t_out.numpy(), rtol=1e-5, atol=1e-5)
      if cnn:
        np.testing.assert_allclose(pooled, t_pooled.numpy(), rtol=1e-5, atol=1e-6)


# --- the full loss on fixed inputs, against the official formulas in PyTorch -----------------------


def _objective(num_local=2, total=10):
  cnn = resnet.ResNet(**resnet.decode_variant('resnet_pico'))  # stride 8: 16 px -> 2x2 map
  v = vit.ViT(**vit.decode_variant('pico/4').kwargs(), image_size=16)
  search = dict(out_dim=24, width=32, depth=1, num_heads=2)
  return mokd.Mokd(
    cnn=cnn, vit=v, cnn_head=heads.DinoHead(24, 16, 8), vit_head=heads.DinoHead(24, 16, 8),
    cnn_search=heads.TransHead(grid=2, in_channels=cnn.out_dim, **search),
    vit_search=heads.TransHead(grid=4, **search), total_steps=total, steps_per_epoch=2,
    num_local=num_local, warmup_teacher_temp_epochs_cnn=3, warmup_teacher_temp_epochs_vit=2,
    global_size=16, local_size=8,
  )  # fmt: skip


class _TorchViT(ref.VisionTransformer):
  """DINO's ViT: position embeddings interpolated (+0.1) for other crop sizes; all tokens out."""

  def tokens(self, x):
    n = x.shape[-1] // self.patch
    x = self.patch_embed(x) + tr.interpolate_grid(self.pos_embed[:, 1:], n)
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x)


def test_full_mokd_loss_matches_torch_official_formula():
  """Mokd.loss at step 0 == main_mokd.py's losses computed by PyTorch models that hold the same
  weights (students == teachers at step 0), crops of two sizes, train-mode BatchNorm."""
  obj = _objective()
  params, extra = jax.jit(obj.init)(jax.random.key(0))  # eager Flax init: 2x slower
  batch = multicrop_helpers.batch(4, 0)
  loss, (metrics, new) = jax.jit(obj.loss)(params, extra, {}, batch, jax.random.key(1))

  p = jax.tree.map(np.asarray, params)
  bn = jax.tree.map(np.asarray, extra['cnn_bn'])

  def torch_models():  # one copy for the student, one for the teacher (own BatchNorm buffers)
    cnn = tr.ResNet(tr.BasicBlock, [1, 1, 1, 1], 0, 8, True)
    tr.load_flax(cnn, {'params': p['cnn']['backbone'], 'batch_stats': bn})
    v = _TorchViT(img_size=16, patch=4, dim=32, depth=2, heads=2)
    tr.load_flax(v, {'params': p['vit']['backbone']})
    c_head, v_head = tr.DINOHead(64, 24, 3, 16, 8), tr.DINOHead(32, 24, 3, 16, 8)
    tr.load_flax(c_head, {'params': p['cnn']['head']})
    tr.load_flax(v_head, {'params': p['vit']['head']})
    c_s = tr.THead(24, 2, 32, 1, 2, in_chans=64)
    v_s = tr.THead(24, 4, 32, 1, 2)
    tr.load_flax(c_s, {'params': p['cnn']['search']})
    tr.load_flax(v_s, {'params': p['vit']['search']})
    for m in (cnn, v, c_head, v_head, c_s, v_s):
      m.train()
    return cnn, v, c_head, v_head, c_s, v_s

  def to_t(x, mean):
    x = (x.astype(np.float32) / 255 - np.asarray(mean.mean)) / np.asarray(mean.std)
    return torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)

  g = np.concatenate([batch['global1'], batch['global2']])
  loc = np.concatenate([batch['local1'], batch['local2']])
  cg, cl = to_t(g, obj.cnn_input_norm), to_t(loc, obj.cnn_input_norm)
  vg, vl = to_t(g, obj.input_norm), to_t(loc, obj.input_norm)
  s_cnn, s_vit, s_chead, s_vhead, s_cs, s_vs = torch_models()
  t_cnn, t_vit, t_chead, t_vhead, t_cs, t_vs = torch_models()
  n = 2
  with torch.no_grad():
    # student cnn: global crops, then local crops
    outs = []
    for x in (cg, cl):
      pooled, fmap = s_cnn.forward_features(x)
      t, red = s_cs(fmap)
      outs.append((s_chead(pooled), t, red))
    s_cnn_m = torch.cat([outs[0][0], outs[1][0]])
    s_cnn_t = torch.cat([outs[0][1], outs[1][1]])
    s_cnn_t_l, s_cnn_out_l = outs[1][1], outs[1][2]
    outs = []
    for x in (vg, vl):
      tok = s_vit.tokens(x)
      outs.append((s_vhead(tok[:, 0]), s_vs(tok[:, 1:])[0], tok[:, 0]))
    s_vit_m = torch.cat([outs[0][0], outs[1][0]])
    s_vit_t = torch.cat([outs[0][1], outs[1][1]])
    s_vit_t_l, s_vit_out_l = outs[1][1], outs[1][2]
    # teachers (CNNTeacherWrapper / ViTTeacherWrapper with local_token)
    pooled, fmap = t_cnn.forward_features(cg)
    t_cnn_m, t_cnn_t = t_chead(pooled), t_cs(fmap)[0]
    t_cnn_search_l = t_cs(fmap.chunk(2)[0].repeat(n, 1, 1, 1), s_vit_out_l)[0]
    tok = t_vit.tokens(vg)
    t_vit_m, t_vit_t = t_vhead(tok[:, 0]), t_vs(tok[:, 1:])[0]
    t_vit_search_l = t_vs(tok[:, 1:].chunk(2)[0].repeat(n, 1, 1), s_cnn_out_l)[0]

    ncrops = 2 + n
    mk = lambda e: tr.DINOLoss(24, ncrops, 0.04, 0.07, e, 10)  # noqa: E731
    l_cnn_m = mk(3)(s_cnn_m, t_cnn_m, 0)
    l_cnn_t = mk(3)(s_cnn_t, t_cnn_t, 0)
    l_ct_cnn = mk(2)(s_cnn_m, t_vit_m, 0)
    l_cs_cnn = tr.ct_search_loss(s_cnn_t_l, t_vit_search_l, 0.04)
    l_cnn = l_cnn_m + l_cnn_t + 1.0 * (l_ct_cnn + l_cs_cnn)
    l_vit_m = mk(2)(s_vit_m, t_vit_m, 0)
    l_vit_t = mk(2)(s_vit_t, t_vit_t, 0)
    l_ct_vit = mk(2)(s_vit_m, t_cnn_m, 0)
    l_cs_vit = tr.ct_search_loss(s_vit_t_l, t_cnn_search_l, 0.04)
    l_vit = l_vit_m + l_vit_t + 0.1 * (l_ct_vit + l_cs_vit)

  for name, mine, theirs in (
    ('cnn', metrics['loss/cnn'], l_cnn_m), ('cnn_search', metrics['loss/cnn_search'], l_cnn_t),
    ('cnn_cross', metrics['loss/cnn_cross'], l_ct_cnn),
    ('cnn_query', metrics['loss/cnn_query'], l_cs_cnn), ('vit', metrics['loss/vit'], l_vit_m),
    ('vit_search', metrics['loss/vit_search'], l_vit_t),
    ('vit_cross', metrics['loss/vit_cross'], l_ct_vit),
    ('vit_query', metrics['loss/vit_query'], l_cs_vit),
    ('cnn_total', metrics['loss/cnn_total'], l_cnn), ('vit_total', metrics['loss/vit_total'], l_vit),
  ):  # fmt: skip
    np.testing.assert_allclose(float(mine), float(theirs), rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(float(loss), float(l_cnn + l_vit), rtol=1e-5)
  # The student CNN's BatchNorm statistics after its two forward passes (global, then local).
  ref_bn = {k: v.numpy() for k, v in s_cnn.state_dict().items() if 'running' in k}
  from convert import layouts

  mine_bn = layouts.flax_to_torch({'batch_stats': jax.tree.map(np.asarray, new['cnn_bn'])})
  for k, v in ref_bn.items():
    np.testing.assert_allclose(mine_bn[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_sinkhorn_centering_reaches_every_dino_term():
  """centering='sinkhorn' (the runlocal recipe): each of MOKD's six DINO terms is DINOv2's
  Sinkhorn-Knopp loss (PyTorch) on its teacher; the entropies read the same targets."""
  k, b, temp = 16, 4, 0.02
  rng = np.random.RandomState(3)
  out = lambda n: rng.randn(n * b, k).astype(np.float32) * 0.3  # noqa: E731
  s_cnn, s_vit = {'head': out(2), 'search': out(2)}, {'head': out(2), 'search': out(2)}
  t_cnn, t_vit = {'head': out(2), 'search': out(2)}, {'head': out(2), 'search': out(2)}
  centers = {c: jnp.full((1, k), 9.0) for c in mokd.CENTERS}  # not read by Sinkhorn-Knopp
  l_cnn, l_vit, _, m = mokd.mokd_losses(
    s_cnn, s_vit, t_cnn, t_vit, centers, temp, temp, n_crops=2, lambda_c=1.0, lambda_t=0.1,
    centering='sinkhorn',
  )  # fmt: skip

  def expected(s, t):  # DINOLoss over 2 global crops with DINOv2's targets
    q = tr.sinkhorn_knopp_teacher(torch.from_numpy(t), temp).chunk(2)
    logp = torch.log_softmax(torch.from_numpy(s) / 0.1, dim=-1).chunk(2)
    return float(sum(torch.sum(-q[i] * logp[1 - i], dim=-1).mean() for i in range(2)) / 2)

  for name, s, t in (
    ('cnn', s_cnn['head'], t_cnn['head']), ('cnn_search', s_cnn['search'], t_cnn['search']),
    ('cnn_cross', s_cnn['head'], t_vit['head']), ('vit', s_vit['head'], t_vit['head']),
    ('vit_search', s_vit['search'], t_vit['search']), ('vit_cross', s_vit['head'], t_cnn['head']),
  ):  # fmt: skip
    np.testing.assert_allclose(float(m[f'loss/{name}']), expected(s, t), rtol=1e-5, err_msg=name)
  assert float(m['loss/cnn_query']) == float(m['loss/vit_query']) == 0.0  # no local crops
  q = tr.sinkhorn_knopp_teacher(torch.from_numpy(t_vit['head']), temp).numpy()
  np.testing.assert_allclose(
    float(m['teacher_entropy/vit']), np.mean(-np.sum(q * np.log(q), axis=-1)), rtol=1e-5
  )
  expected_cnn = m['loss/cnn'] + m['loss/cnn_search'] + m['loss/cnn_cross']
  np.testing.assert_allclose(float(l_cnn), float(expected_cnn), rtol=1e-6)
  expected_vit = m['loss/vit'] + m['loss/vit_search'] + 0.1 * m['loss/vit_cross']
  np.testing.assert_allclose(float(l_vit), float(expected_vit), rtol=1e-6)


def test_losses_touch_only_their_own_model():
  """L_cnn has no gradient on the ViT's parameters and L_vit none on the CNN's."""
  obj = _objective()
  params, extra = jax.jit(obj.init)(jax.random.key(0))  # eager Flax init: 2x slower
  batch = multicrop_helpers.batch(4, 1)

  def part(p, which):
    _, (m, _) = obj.loss(p, extra, {}, batch, jax.random.key(2))
    return m[f'loss/{which}_total']

  @jax.jit
  def grads(p):  # one forward, two backward passes (jacrev's vmapped backward compiles 2x slower)
    _, vjp = jax.vjp(lambda p: jnp.stack([part(p, 'cnn'), part(p, 'vit')]), p)
    return vjp(jnp.array([1.0, 0.0]))[0], vjp(jnp.array([0.0, 1.0]))[0]

  g_cnn, g_vit = grads(params)
  assert optax.global_norm(g_cnn['vit']) == 0 and optax.global_norm(g_cnn['cnn']) > 0
  assert optax.global_norm(g_vit['cnn']) == 0 and optax.global_norm(g_vit['vit']) > 0


def test_per_model_optimizers_and_schedules():
  """SGD for the CNN (search head on the ViT's schedules, official code), AdamW for the ViT,
  last layers frozen in epoch 1, norm_last_layer on the CNN head only."""
  obj = _objective()
  c = mokd_config.get_config('runlocal')
  c.optim_cnn.update(warmup_steps=0, warmup_epochs=0.0)
  c.optim_vit.update(warmup_steps=0, warmup_epochs=0.0)
  tx, lr_v, peak = obj.make_optimizer(c, total_steps=100, steps_per_epoch=2)
  params, _ = jax.jit(obj.init)(jax.random.key(0))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  upd, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
  lr_c = c.optim_cnn.base_lr * c.batch_size / 256
  assert peak == pytest.approx(c.optim_vit.base_lr * c.batch_size / 256)
  wd_c, wd_v = c.optim_cnn.weight_decay, c.optim_vit.weight_decay
  w = params['cnn']['backbone']['conv1']['kernel']
  np.testing.assert_allclose(upd['cnn']['backbone']['conv1']['kernel'], -lr_c * (1e-3 + wd_c * w),
                             rtol=1e-5)  # fmt: skip
  b = params['cnn']['search']['patch_embed']['bias']  # ViT schedules, decayed although a bias
  np.testing.assert_allclose(upd['cnn']['search']['patch_embed']['bias'], -peak * (1e-3 + wd_v * b),
                             rtol=1e-5)  # fmt: skip
  k = params['vit']['backbone']['cls_token']  # Adam's first step: lr * (sign + wd * p)
  np.testing.assert_allclose(upd['vit']['backbone']['cls_token'], -peak * (1e-3 / (1e-3 + 1e-8)
                             + wd_v * k), rtol=1e-4)  # fmt: skip
  for m in ('cnn', 'vit'):
    assert optax.global_norm(upd[m]['head']['last_layer']) == 0  # frozen in epoch 1
    assert optax.global_norm(upd[m]['search']['last_layer']) == 0
  assert float(lr_v(0)) == pytest.approx(peak)
  assert obj.frozen_pattern == '^(cnn/head/last_layer/weight_g$)'


LR = 1e-3  # the CNN's gradients reach thousands: a small SGD step keeps the parameters sane


def test_mokd_8_devices_equal_1():
  """One mesh with both a data and an fsdp axis (each alone is covered by test_dino)."""
  ref_l, ref_p, ref_e = multicrop_helpers.train_steps(
    _objective(), {'data': 1}, jax.devices()[:1], LR
  )
  losses, p, e = multicrop_helpers.train_steps(
    _objective(), {'data': 2, 'fsdp': 4}, jax.devices(), LR
  )
  np.testing.assert_allclose(losses, ref_l, rtol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)  # noqa: E731
  jax.tree.map(close, p, ref_p)
  # BatchNorm running variances of un-normalised activations (values in the hundreds) are sums
  # in another order: float32 round-off of ~2e-5 relative.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=5e-5), e, ref_e)


def test_mokd_config_and_bad_inputs(tmp_path):
  full = mokd_config.get_config()
  assert (full.cnn.arch, full.vit.arch, full.batch_size, full.mokd.lambda_t) == (
    'resnet50', 'S/16', 256, 0.1,
  )  # fmt: skip
  assert full.data.views.local8.size == 96 and full.data.views.global1.scale == (0.25, 1.0)
  c = mokd_config.get_config('runlocal')
  objective, _, start, _ = registry.build_objective(c, 10, 300)
  assert isinstance(objective.cnn, resnet.ResNet) and start is None
  assert objective.flops_per_example() > 0
  c.vit.arch = 'resnet_mu'
  with pytest.raises(ValueError, match="vit: arch='resnet_mu' is a ResNet, but a ViT is expected"):
    registry.build_objective(c, 10, 300)
  c = mokd_config.get_config('runlocal')
  c.data.views.global2.size = 24
  with pytest.raises(ValueError, match='mismatched global crop sizes'):
    registry.build_objective(c, 10, 300)
  assert dino.view_names(2) == (('global1', 'global2'), ('local1', 'local2'))
  sk = mokd_config.get_config('runlocal,recipe=sinkhorn')
  validate.validate(sk, None)
  objective, _, _, _ = registry.build_objective(sk, 10, 4500)
  assert (objective.centering, objective.num_local, sorted(sk.data.views)) == (
    'sinkhorn', 0, ['global1', 'global2'],
  )  # fmt: skip
  with pytest.raises(ValueError, match=r"^recipe='sinkhorn': 'mokd' \(the default\) or, with ru"):
    mokd_config.get_config('recipe=sinkhorn')  # a runlocal recipe only
  sk.mokd.centering = 'sk'
  with pytest.raises(validate.ConfigError, match=r"^mokd.centering='sk': 'center' \(DINO\) or"):
    validate.validate(sk, None)


def test_mokd_starts_from_a_torchvision_resnet_checkpoint(tmp_path):
  torch.manual_seed(0)
  model = tr.ResNet(tr.BasicBlock, [1, 1, 1, 1], 10, 16, True).randomize()  # with an fc
  torch.save(model.state_dict(), tmp_path / 'r.pth')
  c = mokd_config.get_config(f'runlocal,cnn_checkpoint={tmp_path / "r.pth"}')
  objective, _, start, notes = registry.build_objective(c, 10, 300)
  assert objective.cnn.num_classes == 0 and 'resnet_mu' in notes[0]  # DINO's fc = Identity
  params, extra = jax.jit(objective.init)(jax.random.key(0), start)
  w = model.state_dict()['layer2.0.conv1.weight'].numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(params['cnn']['backbone']['layer2_0']['conv1']['kernel'], w)
  mean = model.state_dict()['bn1.running_mean'].numpy()
  np.testing.assert_array_equal(extra['teacher_cnn_bn']['bn1']['mean'], mean)


def test_mokd_checkpoint_converts_either_teacher(tmp_path):
  """MOKD's checkpoint: teacher_vit (plain) and teacher_cnn (DDP 'module.'), each with backbone /
  head / transhead; --checkpoint-key picks the model, the search head is noted, not converted."""
  from convert.__main__ import main as convert_cli
  from moma_jax.models.pretrained import load_pretrained

  torch.manual_seed(0)
  v = ref.VisionTransformer(img_size=16, patch=4, dim=32, depth=1, heads=2)
  cnn = tr.ResNet(tr.BasicBlock, [1, 1, 1, 1], 0, 8, True).randomize()
  state = lambda prefix, m: {f'{prefix}{k}': t for k, t in m.state_dict().items()}  # noqa: E731
  teacher_vit = {**state('backbone.', v), **state('head.', tr.DINOHead(32, 24, 3, 16, 8)),
                 **state('transhead.', tr.THead(24, 4, 32, 1, 2))}  # fmt: skip
  teacher_cnn = {**state('module.backbone.', cnn), **state('module.head.', tr.DINOHead(64, 24, 3, 16, 8)),
                 **state('module.transhead.', tr.THead(24, 2, 32, 1, 2, in_chans=64))}  # fmt: skip
  src = tmp_path / 'mokd.pth'
  torch.save({'teacher_vit': teacher_vit, 'teacher_cnn': teacher_cnn, 'epoch': 5,
              'arch_cnn': 'resnet18', 'arch_vit': 'vit_small'}, src)  # fmt: skip
  assert convert_cli(['--src', str(src), '--dst', str(tmp_path / 'v'), '--num-heads', '2']) == 0
  vit_ckpt = load_pretrained(str(tmp_path / 'v'))
  assert vit_ckpt.metadata['format'] == 'mokd' and set(vit_ckpt.heads) == {'head'}
  assert any('transhead' in n for n in vit_ckpt.metadata['notes'])
  args = ['--src', str(src), '--dst', str(tmp_path / 'c'), '--checkpoint-key', 'teacher_cnn']
  assert convert_cli(args) == 0
  cnn_ckpt = load_pretrained(str(tmp_path / 'c'))
  assert isinstance(cnn_ckpt.model, resnet.ResNet) and cnn_ckpt.metadata['variant'] == 'resnet_pico'
  x = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
  cnn.eval()
  with torch.no_grad():
    expected = cnn.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))[0].numpy()
  np.testing.assert_allclose(cnn_ckpt.model.apply(cnn_ckpt.params, x)[0], expected, atol=1e-5)
  assert (
    convert_cli(['--src', str(src), '--dst', str(tmp_path / 'x'), '--checkpoint-key', 'teacher'])
    == 2
  )
