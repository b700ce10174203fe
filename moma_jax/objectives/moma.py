"""MOMA: distil frozen self-supervised teachers into a masked ViT student.

For each teacher t with weight w_t:
  L_t = SmoothL1_beta( P_t(S(x_student)[aligned]), N(T_t(x))[aligned] )
  L   = sum_t w_t * L_t
S encodes CLS + the visible patches only (MAE-style, no decoder); T_t sees the full image (unless
``mask_teacher``); N is the teacher normalisation; P_t a linear projector to the teacher's width;
``aligned`` selects CLS, the visible patch tokens, or both (the teacher's tokens are gathered at the
student's visible positions).

Open choices of the paper, all options (defaults chosen here and why):
  align='both'            CLS and visible patches: the student has features for exactly these.
  teacher_norm='own+ln'   the teacher's own final norm, then a parameter-free LayerNorm (as FD and
                          MaskAlign, the closest public designs); 'own' or 'ln' (parameter-free LN on
                          the last block's output instead of the teacher's norm).
  smooth_l1_beta=1.0      PyTorch's SmoothL1Loss default (MaskAlign); FD uses 2.0.
  per_teacher_projector   one linear projector per teacher (the multi-teacher loss sums two).
  student_view            per teacher: 'masked' (the teacher's crop, masked), 'strong' (a strongly
                          augmented view of the same crop, masked), or 'both' (average).
  mask_teacher=False      the paper found masking the teacher hurts badly; kept for the ablation.
  projector_warmup_steps  the student encoder is held at lr 0 while the new projectors are fitted
                          (then its own warm-up + cosine over the remaining steps), as in
                          linear-probe-then-fine-tune: the gradients through a random projector
                          otherwise rewrite a pre-trained student (docs/results.md). Not in the
                          paper; 0 = off.
  projector_lr_scale      the projectors' lr = this x the encoder's (1 = the paper's one lr).
  projector_fit_batches   > 0: before the first step of a fresh run, each projector is set to the
                          ridge least-squares fit of the targets from the student's (frozen,
                          masked) tokens over this many training batches, so the encoder's first
                          gradients come through a fitted projector rather than a random one (the
                          closed-form counterpart of the warm-up; issue 29). Not in the paper; 0 = off.
  target_stats='none'     after N, per (token position, channel) over the global batch: 'center'
                          subtracts the batch mean, 'standardize' also divides by the batch std,
                          so the loss weighs what differs between images rather than what every
                          image's target shares (docs/results.md: most of an LN-ed target is the
                          per-position mean). Not in the paper.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moma_jax import flops, masking
from moma_jax import images as viz
from moma_jax.models.pretrained import IMAGENET, Normalization
from moma_jax.models.vit import ViT, gather_tokens, pool_tokens
from moma_jax.objectives import Objective

Array = jax.Array

ALIGN = ('cls', 'patch', 'both')
TEACHER_NORM = ('own+ln', 'own', 'ln')
TARGET_STATS = ('none', 'center', 'standardize')
STUDENT_VIEWS = ('masked', 'strong', 'both')


def layer_norm(x: Array, eps: float = 1e-6) -> Array:
  """Parameter-free LayerNorm over the feature axis, in float32."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def smooth_l1(pred: Array, target: Array, beta: float) -> Array:
  """Element-wise Smooth L1 (PyTorch's definition); beta = 0 is L1."""
  d = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
  if beta <= 0:
    return d
  return jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher: its model (apply-only), loss weight and which student view it matches."""

  model: ViT
  weight: float = 1.0
  student_view: str = 'masked'
  source: str = ''  # checkpoint directory, or 'random' (runlocal without checkpoints)
  input_norm: Normalization = IMAGENET  # the statistics this teacher was trained with


@dataclasses.dataclass(frozen=True)
class Moma(Objective):
  """The MOMA objective: pure functions of (params, frozen teacher params, batch, rng)."""

  student: ViT
  teachers: dict[str, Teacher]
  mask_ratio: float = 0.9
  align: str = 'both'
  teacher_norm: str = 'own+ln'
  smooth_l1_beta: float = 1.0
  per_teacher_projector: bool = True
  mask_teacher: bool = False
  mask_strong_view: bool = True
  projector_warmup_steps: int = 0
  projector_lr_scale: float = 1.0
  projector_fit_batches: int = 0
  target_stats: str = 'none'
  input_norm: Normalization = IMAGENET  # the student's input statistics

  def __post_init__(self):
    if not self.teachers:
      raise ValueError('MOMA needs at least one teacher')
    for name, value, allowed in (
      ('align', self.align, ALIGN),
      ('teacher_norm', self.teacher_norm, TEACHER_NORM),
      ('target_stats', self.target_stats, TARGET_STATS),
    ):
      if value not in allowed:
        raise ValueError(f'moma.{name}={value!r}; choose one of {allowed}')
    masking.num_visible(self.student.num_patches, self.mask_ratio)  # validates the ratio
    s = self.student
    for name, t in self.teachers.items():
      if t.student_view not in STUDENT_VIEWS:
        raise ValueError(f'teacher {name}: student_view={t.student_view!r}; one of {STUDENT_VIEWS}')
      m = t.model
      if m.image_size != s.image_size:
        raise ValueError(
          f'teacher {name} takes {m.image_size}px images but the student takes {s.image_size}px; '
          'convert the teacher with --image-size or change the student'
        )
      if (self.align != 'cls' or self.mask_teacher) and m.grid != s.grid:
        raise ValueError(
          f'teacher {name} has a {m.grid[0]}x{m.grid[1]} patch grid (patch {m.patch_size}), the '
          f'student {s.grid[0]}x{s.grid[1]} (patch {s.patch_size}): patch tokens cannot be '
          "aligned; use moma.align='cls' or matching patch sizes"
        )
    widths = {t.model.width for t in self.teachers.values()}
    if not self.per_teacher_projector and len(widths) > 1:
      raise ValueError(f'teachers have widths {sorted(widths)}: a shared projector needs one width')
    if self.mask_teacher and not self.mask_strong_view:
      raise ValueError('mask_teacher needs mask_strong_view: the student must see the same patches')

  # --- parameters ----------------------------------------------------------------------------------

  def _projector_names(self) -> dict[str, str]:
    """teacher name -> projector parameter name."""
    if self.per_teacher_projector:
      return {n: n for n in self.teachers}
    return {n: 'shared' for n in self.teachers}

  def _projector(self, teacher: str) -> nn.Dense:
    return nn.Dense(self.teachers[teacher].model.width, dtype=self.student.dtype)

  def init(self, rng: Array, student_params: Any | None = None) -> tuple[dict[str, Any], dict]:
    """(trainable parameters {'student': ..., 'projectors': {name: ...}}, extra state {}).

    ``student_params`` (a pre-trained student's 'params') is used instead of a random init.
    """
    k_student, k_proj = jax.random.split(rng)
    s = self.student
    if student_params is None:
      images = jnp.zeros((1, s.image_size, s.image_size, s.channels))
      student_params = s.init(k_student, images)['params']
    projectors = {}
    for teacher, pname in self._projector_names().items():
      if pname not in projectors:
        projectors[pname] = self._projector(teacher).init(k_proj, jnp.zeros((1, s.width)))['params']
    return {'student': student_params, 'projectors': projectors}, {}

  @property
  def frozen_pattern(self) -> str:
    """Parameters the optimizer must not touch: the fixed sin-cos position embedding."""
    return r'^student/pos_embed$'

  def eval_teachers(self) -> dict[str, Teacher]:
    return self.teachers

  @property  # type: ignore[override]  (a property where Objective has a class attribute)
  def lr_groups(self) -> tuple[tuple[str, float, int], ...]:
    """(regex, lr multiplier, steps held at lr 0) per parameter group (``train.make_optimizer``):
    the projector warm-up and the projectors' own lr; none with the paper's single schedule."""
    groups = []
    if self.projector_warmup_steps:
      groups.append((r'^student/', 1.0, self.projector_warmup_steps))
    if self.projector_lr_scale != 1.0:
      groups.append((r'^projectors/', self.projector_lr_scale, 0))
    return tuple(groups)

  @property  # type: ignore[override]
  def prepare_batches(self) -> int:
    return self.projector_fit_batches

  def required_views(self) -> set[str]:
    views = {'teacher'}
    if any(t.student_view in ('strong', 'both') for t in self.teachers.values()):
      views.add('strong')
    return views

  # --- the loss ------------------------------------------------------------------------------------

  def _teacher_tokens(self, teacher: Teacher, variables: Any, images: Array, keep_idx) -> Array:
    """The teacher's output tokens [B, 1 + N (or n), Dt], in its own dtype, before normalising."""
    m = teacher.model
    _, aux = m.apply(variables, images, keep_idx if self.mask_teacher else None)
    tokens = aux[f'block_{m.depth - 1}'] if self.teacher_norm == 'ln' else aux['encoded']
    return jax.lax.stop_gradient(tokens)

  def _target(self, tokens: Array, keep_idx: Array | None) -> Array:
    """Normalised teacher tokens, those ``align`` names, at the student's visible positions when
    ``keep_idx`` is given ([B, 1 + n, Dt], CLS first), as float32.

    The normalisation is per token (LayerNorm) and per position over the batch (target_stats), so
    the positions the loss reads are picked first where that gives the same result: the CLS /
    patch selection always, the per-example gather of the visible tokens when no batch statistic
    is taken, in one gather from the teacher's output. On a TPU the float32 copy of all 197
    tokens and the slices before the gather were ~1 GB of HBM traffic per moco_to_mae step on a
    v5e-8 (by the plan: 163.0 -> 162.2 GB per chip), for the 20 tokens the loss reads."""
    if keep_idx is None:
      tokens = self._select(tokens)
    elif self.align == 'cls':  # the CLS token is always visible
      tokens, keep_idx = tokens[:, :1], None
    elif self.target_stats == 'none':
      tokens, keep_idx = gather_tokens(tokens, self._positions(keep_idx)), None
    target = tokens.astype(jnp.float32)
    if self.teacher_norm != 'own':
      target = layer_norm(target)
    if self.target_stats != 'none':  # per (position, channel), over the (global) batch
      target = target - target.mean(axis=0, keepdims=True)
      if self.target_stats == 'standardize':
        target = target / jnp.sqrt(jnp.mean(jnp.square(target), axis=0, keepdims=True) + 1e-6)
    if keep_idx is not None:
      target = gather_tokens(target, self._positions(keep_idx))
    return target

  def _positions(self, keep_idx: Array) -> Array:
    """Indices into [CLS, patch_1..N] of what ``align`` reads at the visible patches ``keep_idx``."""
    patches = keep_idx + 1
    if self.align == 'patch':
      return patches
    return jnp.concatenate([jnp.zeros_like(keep_idx[:, :1]), patches], axis=1)

  def _select(self, tokens: Array) -> Array:
    if self.align == 'cls':
      return tokens[:, :1]
    if self.align == 'patch':
      return tokens[:, 1:]
    return tokens

  def _pairs(self, params, frozen, batch: dict[str, Array], rng: Array, train: bool = True):
    """[(teacher name, share, student tokens [B, k, Ds], target [B, k, Dt])] of one batch: the
    student's tokens that ``align`` reads (before the projector) and their targets, one pair per
    teacher and student view; share is the pair's part of its teacher's loss (1, or 1/2 for each
    view of a 'both' teacher)."""
    k_mask, k_drop = jax.random.split(rng)
    s = self.student
    images = self.input_norm(batch['teacher'])
    b = images.shape[0]
    keep_idx = masking.random_keep_idx(k_mask, b, s.num_patches, self.mask_ratio)

    needed = set()
    for t in self.teachers.values():
      needed |= {'masked', 'strong'} if t.student_view == 'both' else {t.student_view}
    student_tokens = {}
    for kind in sorted(needed):
      x = images if kind == 'masked' else self.input_norm(batch['strong'])
      idx = keep_idx if (kind == 'masked' or self.mask_strong_view) else None
      with jax.named_scope(f'student_{kind}'):  # names the ops in profiles and plans
        tokens, _ = s.apply(
          {'params': params['student']}, x, idx, train=train, rngs={'dropout': k_drop}
        )
      student_tokens[kind] = (self._select(tokens), idx is not None)

    pairs = []
    for name, t in self.teachers.items():
      with jax.named_scope(f'teacher_{name}'):
        teacher_tokens = self._teacher_tokens(
          t, frozen[name], t.input_norm(batch['teacher']), keep_idx
        )
      kinds = ['masked', 'strong'] if t.student_view == 'both' else [t.student_view]
      for kind in kinds:
        tokens, masked = student_tokens[kind]
        # the teacher's tokens at the visible positions (a masked teacher has only those)
        tgt = self._target(teacher_tokens, keep_idx if masked and not self.mask_teacher else None)
        pairs.append((name, 1.0 / len(kinds), tokens, tgt))
    return pairs

  def loss(
    self,
    params: dict[str, Any],
    extra: dict,
    frozen: dict[str, Any],
    batch: dict[str, Array],
    rng: Array,
  ) -> tuple[Array, tuple[dict[str, Array], dict]]:
    """(loss, (metrics, extra)). batch: {'teacher': uint8 [B,H,W,3], ['strong': uint8]}."""
    pnames = self._projector_names()
    per_teacher: dict[str, Array] = {}
    for name, share, tokens, tgt in self._pairs(params, frozen, batch, rng):
      pred = self._projector(name).apply({'params': params['projectors'][pnames[name]]}, tokens)
      loss = share * smooth_l1(pred, tgt, self.smooth_l1_beta).mean()
      per_teacher[name] = per_teacher.get(name, 0.0) + loss
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for name, loss_t in per_teacher.items():
      metrics[f'loss/{name}'] = loss_t
      total = total + self.teachers[name].weight * loss_t
    metrics['loss'] = total
    return total, (metrics, extra)

  def prepare(self, params, extra, frozen, batches: tuple[dict[str, Array], ...], rng: Array):
    """(params with every projector set to its ridge least-squares fit, {'fit_r2/NAME': R^2}).

    The moments of tokens -> target are summed over ``batches`` (the first
    ``projector_fit_batches`` of the run) and every pair a projector serves, each weighted by its
    teacher's loss weight; the student runs in eval mode with the loss's masking. Written out
    rather than with ``jnp.linalg.lstsq`` so that the sums stream over batches at any batch size
    (only the [Ds, Ds] moments are kept); the data are shifted by the first batch's means before
    they are summed, as float32 sums of raw products lose the small image-specific part of
    targets that are mostly their per-position mean. Smooth L1 is the squared error for residuals
    below beta, so this is the loss's own minimiser once the fit is good."""
    pnames = self._projector_names()
    hp = jax.lax.Precision.HIGHEST
    sums: dict[str, dict[str, Array]] = {}
    for i, batch in enumerate(batches):
      for name, share, tokens, tgt in self._pairs(
        params, frozen, batch, jax.random.fold_in(rng, i), train=False
      ):
        x = tokens.reshape(-1, tokens.shape[-1]).astype(jnp.float32)
        y = tgt.reshape(-1, tgt.shape[-1])
        w = share * self.teachers[name].weight
        acc = sums.setdefault(pnames[name], {'sx': x.mean(0), 'sy': y.mean(0)})
        x, y = x - acc['sx'], y - acc['sy']
        for key, value in (('n', w * x.shape[0]), ('x', w * x.sum(0)), ('y', w * y.sum(0)),
                           ('xx', w * jnp.matmul(x.T, x, precision=hp)),
                           ('xy', w * jnp.matmul(x.T, y, precision=hp)),
                           ('yy', w * jnp.sum(jnp.square(y)))):  # fmt: skip
          acc[key] = acc.get(key, 0.0) + value
    projectors, info = dict(params['projectors']), {}
    for pname, a in sums.items():
      mx, my = a['x'] / a['n'], a['y'] / a['n']
      cxx = a['xx'] - a['n'] * jnp.outer(mx, mx)
      cxy = a['xy'] - a['n'] * jnp.outer(mx, my)
      # A ridge of 1e-6 of the mean variance: the student's tokens leave a LayerNorm, so their
      # covariance is singular (one direction at least); the fit's predictions do not depend on it.
      ridge = 1e-6 * jnp.trace(cxx) / cxx.shape[0]
      kernel = jnp.linalg.solve(cxx + ridge * jnp.eye(cxx.shape[0]), cxy)
      bias = a['sy'] + my - (a['sx'] + mx) @ kernel
      resid = a['yy'] - a['n'] * jnp.sum(my * my) - 2 * jnp.sum(kernel * cxy)
      resid = resid + jnp.sum(kernel * (cxx @ kernel))
      info[f'fit_r2/{pname}'] = 1.0 - resid / (a['yy'] - a['n'] * jnp.sum(my * my))
      projectors[pname] = {'kernel': kernel, 'bias': bias}
    return {**params, 'projectors': projectors}, info

  def visualize(self, params, extra, frozen, batch: dict[str, Array], rng: Array) -> dict:
    """TensorBoard panels (``moma_jax.images``): the teachers' view and what the student sees of
    it, masked as ``loss`` masks with the same ``rng`` (and of the strong view, if used)."""
    k_mask, _ = jax.random.split(rng)
    s = self.student
    full = viz.to_unit(batch['teacher'])
    keep = masking.random_keep_idx(k_mask, full.shape[0], s.num_patches, self.mask_ratio)
    out = {'teacher view': full, 'student sees': viz.masked(full, keep, s.patch_size)}
    if 'strong' in batch:
      strong = viz.to_unit(batch['strong'])
      out['student sees, strong view'] = (
        viz.masked(strong, keep, s.patch_size) if self.mask_strong_view else strong
      )
    return out

  def features(self, params, extra, frozen, images: Array, pool: str = 'cls') -> Array:
    """The student's tokens on the full image, pooled (``vit.pool_tokens``): [B, D] or [B, 2D]
    (uint8 images in)."""
    tokens, _ = self.student.apply({'params': params['student']}, self.input_norm(images))
    return pool_tokens(tokens, pool).astype(jnp.float32)

  def export(self, params: dict[str, Any], extra: dict) -> dict[str, tuple[Any, Any, None]]:
    """What the trainer exports at the end: the student encoder."""
    return {'encoder': (self.student, {'params': params['student']}, None)}

  # --- cost ----------------------------------------------------------------------------------------

  def flops_per_example(self) -> float:
    """Model FLOPs of one training example: teacher forwards + 3 x student forward (fwd + bwd)."""
    s = self.student
    n = masking.num_visible(s.num_patches, self.mask_ratio)
    total = 0.0
    kinds: set[str] = set()
    for t in self.teachers.values():
      m = t.model
      tok = n if self.mask_teacher else m.num_patches
      total += flops.vit_flops(m, tok)
      t_kinds = {'masked', 'strong'} if t.student_view == 'both' else {t.student_view}
      kinds |= t_kinds
      total += 3 * 2.0 * (1 + n) * s.width * m.width * len(t_kinds)  # projector fwd + bwd
    for kind in kinds:
      tok = n if (kind == 'masked' or self.mask_strong_view) else s.num_patches
      total += 3 * flops.vit_flops(s, tok)
    return total
