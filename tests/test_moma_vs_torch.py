"""The MOMA trainer against an independent PyTorch implementation (issue 29, item 5).

The PyTorch side is written from the paper's description and MAE's optimizer recipe, not from this
code: the teacher sees the whole image, its final tokens are LayerNorm-ed without parameters, the
student sees the visible patches of its (strong) view, a linear projector maps its tokens to the
teacher's width, Smooth L1 on CLS + visible tokens; AdamW (decay on matrices but CLS / position
embeddings), linear warm-up then cosine, the encoder held at lr 0 while the new projector fits
(projector warm-up) and the projector at 10x the lr. Both start from the same weights (PyTorch
checkpoints in the official MAE / MoCo v3 formats, read by the converter), train on the same
batches with the same masks, and must agree at every step and at the end.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import torch
import torch.nn.functional as F

from configs import common, moco_to_mae
from convert.convert import convert_checkpoint
from moma_jax import masking, train
from moma_jax.models.pretrained import load_pretrained

import torch_reference as ref

SIZE, PATCH, BATCH, STEPS, HOLD, WARMUP = 32, 4, 16, 12, 4, 3
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _lr(t: int, peak: float, total: int) -> float:
  """Linear warm-up from 0 over WARMUP steps, then half-cosine to 0 at ``total``."""
  if t < WARMUP:
    return peak * t / WARMUP
  return 0.5 * peak * (1 + math.cos(math.pi * (t - WARMUP) / (total - WARMUP)))


class TorchMoma:
  """One teacher, student view 'strong' masked at the same positions, align CLS + visible."""

  def __init__(self, student, teacher, projector, peak, wd=0.05, lr_scale=10.0):
    self.student, self.teacher, self.projector = student, teacher, projector
    self.peak, self.lr_scale = peak, lr_scale
    decay, no_decay = [], []
    for name, p in student.named_parameters():
      if p.requires_grad:  # the fixed sin-cos position embedding is not trained
        (no_decay if p.ndim < 2 or name in ('cls_token', 'pos_embed') else decay).append(p)
    self.opt = torch.optim.AdamW(
      [
        {'params': decay, 'weight_decay': wd, 'role': 'encoder'},
        {'params': no_decay, 'weight_decay': 0.0, 'role': 'encoder'},
        {'params': [projector.weight], 'weight_decay': wd, 'role': 'projector'},
        {'params': [projector.bias], 'weight_decay': 0.0, 'role': 'projector'},
      ],
      lr=0.0, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip

  @staticmethod
  def _normalise(images: np.ndarray) -> torch.Tensor:
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)

  def step(self, t: int, batch: dict, keep_idx: np.ndarray) -> float:
    for g in self.opt.param_groups:
      if g['role'] == 'encoder':
        g['lr'] = 0.0 if t < HOLD else _lr(t - HOLD, self.peak, STEPS - HOLD)
      else:
        g['lr'] = self.lr_scale * _lr(t, self.peak, STEPS)
    keep = torch.from_numpy(keep_idx.astype(np.int64))
    with torch.no_grad():
      tokens, _ = self.teacher.forward_encoder(self._normalise(batch['teacher']))
      tokens = F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)
      patches = torch.gather(tokens[:, 1:], 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
      target = torch.cat([tokens[:, :1], patches], dim=1)
    student_tokens, _ = self.student.forward_encoder(self._normalise(batch['strong']), keep)
    loss = F.smooth_l1_loss(self.projector(student_tokens), target, beta=1.0)
    self.opt.zero_grad()
    loss.backward()
    self.opt.step()
    return loss.item()


def test_moma_trainer_follows_an_independent_torch_implementation(tmp_path):
  torch.manual_seed(0)
  teacher = ref.VisionTransformer(img_size=SIZE, patch=PATCH, dim=32, depth=2, heads=2)
  student = ref.VisionTransformer(img_size=SIZE, patch=PATCH, dim=24, depth=2, heads=2)
  ref.save_mocov3(teacher, str(tmp_path / 'moco.pth.tar'))
  ref.save_mae(student, str(tmp_path / 'mae.pth'))
  teacher.head = None  # save_mocov3 attached MoCo's projection MLP; MOMA reads the encoder
  for name in ('moco.pth.tar', 'mae.pth'):
    convert_checkpoint(str(tmp_path / name), str(tmp_path / name.split('.')[0]), num_heads=2)

  config = common.override(
    moco_to_mae.get_config('runlocal,recipe=paper'),
    {
      'teachers.moco.checkpoint': str(tmp_path / 'moco'), 'student.checkpoint': str(tmp_path / 'mae'),
      'batch_size': BATCH, 'num_train_steps': STEPS, 'optim.warmup_steps': WARMUP,
      'optim.base_lr': 0.02, 'moma.projector_warmup_steps': HOLD, 'data.image_size': SIZE,
    },
  )  # fmt: skip
  assert config.moma.projector_lr_scale == 10.0 and config.optim.weight_decay == 0.05
  setup = train.build_setup(config, jax.devices()[:1], lambda: (40 * BATCH, 10))
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  state, _, _ = train.create_state(
    setup.objective, setup.tx, setup.mesh, config.sharding_rules, init_rng, setup.start_params
  )
  step = jax.jit(train.make_train_step(setup.objective, setup.tx, setup.schedule))

  proj = state.params['projectors']['moco']
  projector = torch.nn.Linear(24, 32)
  with torch.no_grad():
    projector.weight.copy_(torch.from_numpy(np.array(proj['kernel']).T))
    projector.bias.copy_(torch.from_numpy(np.array(proj['bias'])))
  theirs = TorchMoma(student, teacher, projector, peak=setup.peak_lr)
  assert np.isclose(setup.peak_lr, 0.02 * BATCH / 256)

  rng = np.random.RandomState(0)
  num_patches = (SIZE // PATCH) ** 2
  for t in range(STEPS):
    batch = {
      v: rng.randint(0, 256, (BATCH, SIZE, SIZE, 3)).astype(np.uint8) for v in ('teacher', 'strong')
    }
    # The trainer's masks for step t, from its documented key derivation (fold in the step, the
    # first half of the split is the mask key), handed to the PyTorch side.
    k_mask, _ = jax.random.split(jax.random.fold_in(train_rng, t))
    keep_idx = np.asarray(
      masking.random_keep_idx(k_mask, BATCH, num_patches, config.moma.mask_ratio)
    )
    state, metrics = step(state, setup.frozen, batch, train_rng)
    expected = theirs.step(t, batch, keep_idx)
    np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-4, err_msg=f'step {t}')

  ref.save_mae(student, str(tmp_path / 'trained.pth'))
  convert_checkpoint(str(tmp_path / 'trained.pth'), str(tmp_path / 'trained'), num_heads=2)
  trained = load_pretrained(str(tmp_path / 'trained')).params['params']
  start = load_pretrained(str(tmp_path / 'mae')).params['params']
  moved = []

  key_bound = sum(_lr(t - HOLD, setup.peak_lr, STEPS - HOLD) for t in range(HOLD, STEPS))

  def check(path, mine, want, init):
    where = jax.tree_util.keystr(path)
    (mine, want, init), key = ref.key_bias_apart(where, mine, want, init)
    if key is not None:
      np.testing.assert_allclose(key[0], key[1], atol=key_bound, err_msg=where)
    err = np.abs(mine - want).max() / max(np.abs(want).max(), 1e-12)
    assert err <= 1e-4, (where, err)
    moved.append(np.abs(want - init).max() / max(np.abs(want).max(), 1e-12))

  jax.tree_util.tree_map_with_path(check, state.params['student'], trained, start)
  torch_proj = {
    'kernel': projector.weight.detach().numpy().T,
    'bias': projector.bias.detach().numpy(),
  }
  jax.tree_util.tree_map_with_path(check, state.params['projectors']['moco'], torch_proj, proj)
  # The comparison is not vacuous: training moved the parameters by far more than the tolerance.
  assert np.median(moved) > 1e-2, np.median(moved)
