"""The MOMA objective and the sharded train step."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from moma_jax import optim, sharding, train
from moma_jax.models import vit
from moma_jax.objectives.moma import Moma, Teacher, layer_norm, smooth_l1

from runlocal_helpers import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vit(variant='mu/4', **kw):
  return vit.ViT(**vit.decode_variant(variant).kwargs(), image_size=32, **kw)


def _objective(**kw) -> tuple[Moma, dict]:
  # Two teachers of different widths (the projectors map 64 -> 64 and 64 -> 96), same patch grid.
  wide = vit.ViT(width=96, depth=1, num_heads=3, mlp_dim=384, patch_size=4, image_size=32)
  teachers = {'mae': _vit(), 'moco': wide}
  frozen = {
    n: m.init(jax.random.key(i + 10), jnp.zeros((1, 32, 32, 3)))
    for i, (n, m) in enumerate(teachers.items())
  }
  obj = Moma(
    student=_vit(),
    teachers={
      'mae': Teacher(teachers['mae'], 0.5, 'masked'),
      'moco': Teacher(teachers['moco'], 0.5, 'strong'),
    },
    **kw,
  )
  return obj, frozen


def _batch(n=16, seed=0):
  rng = np.random.RandomState(seed)
  return {
    'teacher': rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8),
    'strong': rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8),
  }


def test_smooth_l1_and_layer_norm_match_torch():
  x = np.random.RandomState(0).randn(4, 7, 16).astype(np.float32) * 3
  y = np.random.RandomState(1).randn(4, 7, 16).astype(np.float32)
  for beta in (0.5, 1.0, 2.0):
    ref = torch.nn.functional.smooth_l1_loss(torch.tensor(x), torch.tensor(y), beta=beta)
    np.testing.assert_allclose(np.asarray(smooth_l1(x, y, beta).mean()), ref.numpy(), rtol=1e-6)
  ref_ln = torch.nn.functional.layer_norm(torch.tensor(x), (16,), eps=1e-6)
  np.testing.assert_allclose(np.asarray(layer_norm(x)), ref_ln.numpy(), atol=1e-5)


@pytest.mark.parametrize(
  'stats, align',
  [('none', 'both'), ('center', 'both'), ('standardize', 'both'), ('none', 'patch'),
   ('center', 'patch'), ('standardize', 'cls')],
)  # fmt: skip
def test_loss_against_a_direct_computation(stats, align):
  """own+ln (+ batch statistics per position and channel) on all the teacher's tokens, then the
  visible ones gathered and ``align``'s selected: recompute the loss by hand from the models'
  outputs (the objective selects and gathers first where that is the same)."""
  obj, frozen = _objective(target_stats=stats, align=align)
  params, extra = obj.init(jax.random.key(0))
  batch = _batch()
  rng = jax.random.key(5)
  loss, (metrics, _) = obj.loss(params, extra, frozen, batch, rng)
  k_mask, _ = jax.random.split(rng)
  from moma_jax import masking
  from moma_jax.data.mixing import normalize

  keep = masking.random_keep_idx(k_mask, 16, 64, 0.9)
  x, xs = normalize(batch['teacher']), normalize(batch['strong'])
  total = 0.0
  for name, view in (('mae', x), ('moco', xs)):
    t = obj.teachers[name].model
    tt, _ = t.apply(frozen[name], x)
    tgt = np.asarray(layer_norm(tt), np.float64)
    if stats != 'none':
      tgt = tgt - tgt.mean(0)
    if stats == 'standardize':
      tgt = tgt / np.sqrt(tgt.var(0) + 1e-6)
    tgt = np.concatenate(
      [tgt[:, :1], np.take_along_axis(tgt[:, 1:], np.asarray(keep)[..., None], 1)], 1
    )
    st, _ = obj.student.apply({'params': params['student']}, view, keep)
    p = params['projectors'][name]
    pred = np.asarray(st) @ np.asarray(p['kernel']) + np.asarray(p['bias'])
    sel = {'both': slice(None), 'cls': slice(0, 1), 'patch': slice(1, None)}[align]
    d = np.abs(pred[:, sel] - tgt[:, sel])
    expected = np.where(d < 1.0, 0.5 * d * d, d - 0.5).mean()
    np.testing.assert_allclose(metrics[f'loss/{name}'], expected, rtol=1e-5)
    total += 0.5 * expected
  np.testing.assert_allclose(loss, total, rtol=1e-5)


def test_projector_fit_is_the_least_squares_solution():
  """moma.projector_fit_batches: each projector set to the least-squares map from the student's
  tokens (eval mode, the loss's masks) to its teacher's targets over the batches, recomputed
  here from the models' outputs with numpy's lstsq; R^2 as logged."""
  from moma_jax import masking
  from moma_jax.data.mixing import normalize

  obj, frozen = _objective(align='both', projector_fit_batches=2)
  params, extra = obj.init(jax.random.key(0))
  batches = (_batch(seed=0), _batch(seed=1))
  rng = jax.random.key(7)
  fitted, info = jax.jit(obj.prepare)(params, extra, frozen, batches, rng)
  jax.tree.map(np.testing.assert_array_equal, fitted['student'], params['student'])
  for name, view in (('mae', 'teacher'), ('moco', 'strong')):
    xs, ys = [], []
    for i, batch in enumerate(batches):
      k_mask, _ = jax.random.split(jax.random.fold_in(rng, i))
      keep = np.asarray(masking.random_keep_idx(k_mask, 16, 64, 0.9))
      pos = np.concatenate([np.zeros_like(keep[:, :1]), keep + 1], 1)
      st, _ = obj.student.apply({'params': params['student']}, normalize(batch[view]), keep)
      tt, _ = obj.teachers[name].model.apply(frozen[name], normalize(batch['teacher']))
      tgt = np.take_along_axis(np.asarray(layer_norm(tt), np.float64), pos[..., None], 1)
      xs.append(np.asarray(st, np.float64).reshape(-1, 64))
      ys.append(tgt.reshape(-1, tgt.shape[-1]))
    x = np.concatenate([np.concatenate(xs), np.ones((len(xs) * 16 * 7, 1))], 1)
    y = np.concatenate(ys)
    # The student's tokens leave its final LayerNorm: [x, 1] has one direction at float32
    # rounding level (singular value ~1e-8 of the largest), which a fit must leave alone (as the
    # objective's ridge does) rather than fit its noise with huge weights (rcond=None does).
    w = np.linalg.lstsq(x, y, rcond=1e-4)[0]
    p = fitted['projectors'][name]
    ours = x @ np.concatenate([np.asarray(p['kernel']), np.asarray(p['bias'])[None]], 0)
    np.testing.assert_allclose(ours, x @ w, atol=1e-3 * np.abs(y).max())
    r2 = 1 - np.square(y - x @ w).sum() / np.square(y - y.mean(0)).sum()
    np.testing.assert_allclose(info[f'fit_r2/{name}'], r2, atol=1e-3)
  # The fitted projectors give a lower loss than the random ones on the batches they saw.
  before = obj.loss(params, extra, frozen, batches[0], jax.random.key(1))[0]
  after = obj.loss(fitted, extra, frozen, batches[0], jax.random.key(1))[0]
  assert float(after) < 0.5 * float(before), (before, after)


def test_projector_fit_of_a_teacher_copy_is_exact():
  """A student that is its teacher, unmasked, with the teacher's own norm as the target: the
  identity is an exact solution, so the fitted projector's loss is zero on new images. (Its
  weights need not be the identity: the tokens leave a LayerNorm, whose constraint leaves one
  direction free.)"""
  t = _vit()
  variables = t.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
  obj = Moma(student=t, teachers={'t': Teacher(t)}, mask_ratio=0.0, teacher_norm='own',
             projector_fit_batches=1)  # fmt: skip
  params, extra = obj.init(jax.random.key(0), variables['params'])
  fitted, info = obj.prepare(params, extra, {'t': variables}, (_batch(),), jax.random.key(1))
  assert float(info['fit_r2/t']) > 0.9999
  before = obj.loss(params, extra, {'t': variables}, _batch(seed=2), jax.random.key(4))[0]
  after = obj.loss(fitted, extra, {'t': variables}, _batch(seed=2), jax.random.key(4))[0]
  assert float(after) < 1e-6 < float(before), (before, after)


def test_trainer_prepare_stage_fits_on_the_augmented_batches_and_puts_them_back():
  """train.prepare_state: the objective's prepare sees the first batches as the step does (after
  the on-device ``augment``; here a stand-in for the photometric ops that inverts the strong
  view), only the projectors change, and the stream still yields every batch in order."""
  obj, frozen = _objective(projector_fit_batches=2)
  mesh = sharding.make_mesh({'data': 1}, jax.devices()[:1])
  state, ssh, _ = train.create_state(
    obj, optim.adamw(1e-3), mesh, [('.*', None)], jax.random.key(0)
  )

  def aug(b):
    return {**b, 'strong': 255 - b['strong']}

  items = [(_batch(seed=i), i + 1) for i in range(3)]
  new, stream = train.prepare_state(
    obj, mesh, state, ssh, frozen, iter(items), jax.random.key(1), aug
  )
  assert [i for _, i in stream] == [1, 2, 3]
  jax.tree.map(np.testing.assert_array_equal, new.params['student'], state.params['student'])
  views = tuple(aug(b) for b, _ in items[:2])
  want, _ = jax.jit(obj.prepare)(
    state.params, state.extra, frozen, views, jax.random.fold_in(jax.random.key(1), 1)
  )
  # The same fit: the same predictions (the weights themselves are not unique: LayerNorm-ed
  # tokens leave one direction free), so the same loss on an augmented batch.
  loss = jax.jit(lambda p: obj.loss(p, state.extra, frozen, views[0], jax.random.key(2))[0])
  np.testing.assert_allclose(loss(new.params), loss(want), rtol=1e-4)
  assert float(loss(new.params)) < 0.5 * float(loss(state.params))


def test_teacher_gets_no_gradient_and_flops():
  obj, frozen = _objective()
  params, extra = obj.init(jax.random.key(0))
  g = jax.grad(lambda f: obj.loss(params, extra, f, _batch(), jax.random.key(1))[0])(frozen)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g))
  # B->B paper figure (REFERENCE section 5): ~45.9 GFLOP per image
  b = vit.ViT(**vit.decode_variant('B/16').kwargs())
  bb = Moma(student=b, teachers={'t': Teacher(b)}, align='cls')
  assert 44e9 < bb.flops_per_example() < 47e9


def test_config_mismatches_are_clear_errors():
  t = _vit('mu/8')
  with pytest.raises(ValueError, match='patch tokens cannot be aligned'):
    Moma(student=_vit(), teachers={'t': Teacher(t)}, align='both')
  with pytest.raises(ValueError, match='takes 48px images'):
    Moma(
      student=_vit(),
      teachers={'t': Teacher(vit.ViT(**vit.decode_variant('mu/4').kwargs(), image_size=48))},
    )
  with pytest.raises(ValueError, match="align='diag'"):
    Moma(student=_vit(), teachers={'t': Teacher(_vit())}, align='diag')


def _run_steps(mesh_axes, devices, steps=3):
  obj, frozen = _objective()
  mesh = sharding.make_mesh(mesh_axes, devices)
  # Adam moves every parameter by ~lr whatever its gradient's size, so gradients that are zero up
  # to float round-off (whose summation order differs across shardings) differ by O(lr) after
  # the update: lr = 1e-4 keeps that under the 1e-5 tolerance.
  tx = optim.adamw(1e-4, frozen=obj.frozen_pattern)
  state, state_sh, _ = train.create_state(obj, tx, mesh, [('.*', 'fsdp')], jax.random.key(0))
  frozen_sh = sharding.infer_shardings(frozen, mesh, [('.*', 'fsdp')])
  frozen = jax.device_put(frozen, frozen_sh)
  before = sharding.to_host(frozen)
  step = train.jit_train_step(obj, tx, lambda s: 1e-4, mesh, state_sh, frozen_sh)
  from moma_jax.data import device

  bsh = device.batch_sharding(mesh, sharding.data_axes(mesh))
  losses = []
  for i in range(steps):
    batch = device.make_global(_batch(16, seed=i), bsh)
    state, m = step(state, frozen, batch, jax.random.key(42))
    losses.append(float(m['loss']))
  after = sharding.to_host(frozen)
  jax.tree.map(np.testing.assert_array_equal, before, after)  # teachers untouched
  return losses, sharding.to_host(state.params), state


def test_sharded_steps_match_single_device():
  devs = jax.devices()
  assert len(devs) == 8
  ref_loss, ref_params, _ = _run_steps({'data': 1}, devs[:1])
  for axes in ({'data': 8, 'fsdp': 1}, {'data': 1, 'fsdp': 8}, {'data': 2, 'fsdp': 4}):
    loss, params, state = _run_steps(axes, devs)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), params, ref_params
    )
    if axes.get('fsdp', 1) > 1:  # parameters really are split
      qkv = state.params['student']['blocks_0']['attn']['qkv']['kernel']
      assert qkv.addressable_shards[0].data.size < qkv.size


def test_two_processes_match_one(tmp_path):
  """jax.distributed on loopback: 2 processes x 4 CPU devices == 1 process x 8 devices."""
  ref_loss, ref_params, _ = _run_steps({'data': 8}, jax.devices())
  script = textwrap.dedent(f"""
    import os, sys
    sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
    import jax
    jax.config.update('jax_default_matmul_precision', 'highest')
    pid = int(sys.argv[1])
    jax.distributed.initialize('127.0.0.1:' + sys.argv[2], num_processes=2, process_id=pid)
    import numpy as np
    import test_moma as t
    from moma_jax.data import device
    orig = device.make_global
    def local_slice(batch, sharding):  # each process contributes its half of the global batch
      half = {{k: v[pid * 8:(pid + 1) * 8] for k, v in batch.items()}}
      return orig(half, sharding)
    device.make_global = local_slice
    losses, params, _ = t._run_steps({{'data': 8}}, jax.devices())
    if pid == 0:
      flat = {{'/'.join(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}}
      np.savez(sys.argv[3], losses=np.array(losses), **{{k.replace("'", ''): v for k, v in flat.items()}})
  """)
  path = tmp_path / 'proc.py'
  path.write_text(script)
  import socket

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = str(s.getsockname()[1])
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': f'--xla_force_host_platform_device_count=4 {FAST_COMPILE}',
  }
  out = tmp_path / 'out.npz'
  procs = [
    subprocess.Popen([sys.executable, str(path), str(i), port, str(out)], env=env) for i in range(2)
  ]
  assert [p.wait(timeout=300) for p in procs] == [0, 0]
  got = np.load(out)
  np.testing.assert_allclose(got['losses'], ref_loss, rtol=1e-5)
  flat = {
    '/'.join(map(str, k)).replace("'", ''): v
    for k, v in jax.tree_util.tree_flatten_with_path(ref_params)[0]
  }
  assert len(flat) == len(got.files) - 1
  for k, v in flat.items():
    np.testing.assert_allclose(got[k], v, atol=1e-5, rtol=1e-5)


def test_each_model_sees_its_own_input_statistics(tmp_path):
  """A teacher trained with mean = std = 0.5 (as many timm ViTs) is fed (x / 255 - 0.5) / 0.5,
  the student ImageNet-normalised pixels; checked against a NumPy recomputation of the loss."""
  from configs import common
  from moma_jax import builders, masking
  from moma_jax.models import pretrained

  teacher = _vit()
  t_vars = teacher.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
  half = {'mean': [0.5] * 3, 'std': [0.5] * 3}
  pretrained.save_pretrained(
    tmp_path / 'teacher', {'encoder': pretrained.spec_of(teacher)}, {'encoder': t_vars}, half
  )
  config = common.shortened_runlocal(
    'moco_to_mae:recipe=paper', 1, checkpoint_every=1, log_every=1,
    overrides={'teachers.moco.checkpoint': str(tmp_path / 'teacher'),
               'teachers.moco.student_view': 'masked', 'student.checkpoint': ''},
  )  # fmt: skip
  obj, frozen, _, _ = builders.build_moma(config)
  assert obj.teachers['moco'].input_norm.mean == (0.5, 0.5, 0.5)
  assert obj.input_norm == pretrained.IMAGENET

  params, extra = obj.init(jax.random.key(0))
  batch = _batch(8)
  rng = jax.random.key(7)
  loss, _ = obj.loss(params, extra, frozen, batch, rng)
  keep = np.asarray(masking.random_keep_idx(jax.random.split(rng)[0], 8, 64, obj.mask_ratio))
  pixels = batch['teacher'].astype(np.float32) / 255
  x_teacher = (pixels - 0.5) / 0.5
  x_student = (pixels - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  tt, _ = teacher.apply(frozen['moco'], jnp.asarray(x_teacher, jnp.float32))
  tgt = np.asarray(layer_norm(tt))
  tgt = np.concatenate([tgt[:, :1], np.take_along_axis(tgt[:, 1:], keep[..., None], 1)], 1)
  st, _ = obj.student.apply(
    {'params': params['student']}, jnp.asarray(x_student, jnp.float32), keep
  )
  p = params['projectors']['moco']
  d = np.abs(np.asarray(st) @ np.asarray(p['kernel']) + np.asarray(p['bias']) - tgt)
  np.testing.assert_allclose(loss, np.where(d < 1.0, 0.5 * d * d, d - 0.5).mean(), rtol=1e-5)

  # The export records the student's statistics, and loading hands them back.
  out = train.export_model(
    obj.export(params, extra), tmp_path / 'wd', {'steps': 0}, None, pretrained.Normalization(**half)
  )
  assert pretrained.load_pretrained(out).normalization.std == (0.5, 0.5, 0.5)


def test_scanned_teachers_and_rematerialised_student_give_the_same_loss():
  """config.teacher_scan (stacked teacher weights under nn.scan) and student.remat='block' are
  memory / compile-time options: the loss and its gradient must not change."""
  from configs import common
  from moma_jax import builders

  def loss_and_grad(**overrides):
    config = common.shortened_runlocal(
      'moco_to_mae', 1, checkpoint_every=1, log_every=1, overrides=overrides
    )
    obj, frozen, start, _ = builders.build_moma(config)
    params, extra = obj.init(jax.random.key(0), start)
    fn = lambda p: obj.loss(p, extra, frozen, _batch(8), jax.random.key(2))[0]  # noqa: E731
    return jax.value_and_grad(fn)(params)

  (l0, g0), (l1, g1) = (
    loss_and_grad(),
    loss_and_grad(teacher_scan=True, **{'student.remat': 'block'}),
  )
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_supervised_classifier_serves_as_a_teacher_without_its_head(tmp_path):
  """A CLS-pool classifier (timm / fine-tuned MAE format, with its head) is a teacher: its targets
  are the PyTorch model's tokens after the final norm (then MOMA's LayerNorm); a global-pool one,
  whose tokens skip that norm, is refused in one line before anything runs."""
  from configs import common
  from convert.convert import convert_checkpoint
  from moma_jax import builders

  import torch_reference as ref

  torch.manual_seed(0)
  sup = ref.VisionTransformer(img_size=32, patch=4, dim=64, depth=2, heads=2, num_classes=10)
  gap = ref.VisionTransformer(img_size=32, patch=4, dim=64, depth=2, heads=2, num_classes=10,
                              global_pool=True)  # fmt: skip
  for name, model in (('sup', sup), ('gap', gap)):
    ref.save_mae(model, str(tmp_path / f'{name}.pth'))
    convert_checkpoint(str(tmp_path / f'{name}.pth'), str(tmp_path / name), num_heads=2)
  config = common.shortened_runlocal(
    'mae_to_moco', 1, checkpoint_every=1, log_every=1,
    overrides={'teachers.mae.checkpoint': str(tmp_path / 'sup'), 'student.checkpoint': ''},
  )  # fmt: skip
  obj, frozen, _, _ = builders.build_moma(config)
  teacher = obj.teachers['mae']
  assert teacher.model.num_classes == 0 and 'head' not in frozen['mae']['params']
  x = np.random.RandomState(0).randn(4, 32, 32, 3).astype(np.float32)
  tokens, _ = teacher.model.apply(frozen['mae'], jnp.asarray(x))
  with torch.no_grad():
    want, _ = sup.forward_encoder(torch.from_numpy(x).permute(0, 3, 1, 2))
  np.testing.assert_allclose(np.asarray(tokens), want.numpy(), atol=1e-5, rtol=1e-5)

  config.teachers.mae.checkpoint = str(tmp_path / 'gap')
  with pytest.raises(ValueError, match='pool=gap.*classifier.pool=cls'):
    builders.build_moma(config)
