"""DINO: self-distillation with no labels, for a ViT or a ResNet, multi-crop; the self-distillation
half of MOKD (objectives/mokd.py reuses every piece here).

Following the official code (github facebookresearch/dino, main_dino.py):
  * student = backbone + DINOHead, teacher = its EMA (momentum 0.996 -> 1, cosine, per step);
  * views: 2 global crops (the teacher sees them) and N local crops (the student sees all);
    crops of one size are encoded together (one BatchNorm batch per size, as MultiCropWrapper);
    a ViT encodes local crops with its position embeddings bicubically resized (+0.1 trick);
  * loss: teacher softmax((t - center) / T_t), student log-softmax(s / 0.1), cross-entropy summed
    over teacher view x every *other* student view, averaged over the pairs; the center is an EMA
    (0.9) of the teacher's global-batch mean; T_t warms linearly per *epoch* (DINO indexes its
    schedule by epoch) from 0.04;
  * optimizer (``dino_optimizer``): AdamW (or SGD for ResNets) with per-iteration cosine lr and
    weight-decay schedules, no decay on biases and 1-D parameters (DINO decays pos_embed and
    cls_token, unlike MAE), gradient clipping per parameter tensor (DINO's ``clip_gradients``, not
    the global norm), the ``last_layer`` frozen during the first epoch(s) (its gradient dropped,
    so neither its moments nor its weight decay move), ``last_layer.weight_g`` frozen with
    ``norm_last_layer``.

Global-batch semantics (center, BatchNorm statistics, the loss mean) come from jit over global
arrays, whatever the sharding; the tests check 8 devices against 1.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moma_jax import ema, flops, optim
from moma_jax.models import resnet
from moma_jax.models.heads import DinoHead, resample_pos_grid
from moma_jax.models.pretrained import IMAGENET, Normalization
from moma_jax.models.vit import ViT
from moma_jax.objectives import Objective
from moma_jax.optim import path_str

Array = jax.Array


# --- schedules -------------------------------------------------------------------------------------


def cosine_schedule(
  base: float, final: float, total_steps: int, warmup_steps: int = 0, start: float = 0.0
) -> Callable[[Array], Array]:
  """DINO's ``cosine_scheduler`` as a function of the step: ``linspace(start, base, warmup)``,
  then ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` over the remaining n steps."""
  warmup_steps = int(min(warmup_steps, total_steps))
  n = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    denom = max(warmup_steps - 1, 1)
    warm = start + (base - start) * step / denom if warmup_steps > 1 else jnp.float32(start)
    i = jnp.clip(step - warmup_steps, 0, n)
    cos = final + 0.5 * (base - final) * (1.0 + jnp.cos(np.pi * i / n))
    return jnp.where(step < warmup_steps, warm, cos)

  return schedule


def teacher_temperature(
  step: Array, steps_per_epoch: int, warmup: float, final: float, warmup_epochs: int
) -> Array:
  """DINO's teacher temperature: ``linspace(warmup, final, warmup_epochs)[epoch]``, then final;
  the epoch is ``step // steps_per_epoch`` (constant within an epoch, as in the official code)."""
  epoch = (jnp.asarray(step) // max(steps_per_epoch, 1)).astype(jnp.float32)
  if warmup_epochs <= 0:
    return jnp.float32(final)
  frac = epoch / max(warmup_epochs - 1, 1) if warmup_epochs > 1 else jnp.float32(0.0)
  return jnp.where(epoch < warmup_epochs, warmup + (final - warmup) * frac, final)


# --- the loss --------------------------------------------------------------------------------------


def dino_cross_entropy(
  student: Sequence[Array], teacher_probs: Sequence[Array], student_temp: float
) -> Array:
  """Mean over (teacher view iq, student view v != iq) of CE(teacher_probs[iq], student[v] / T_s).

  student: n_crops arrays [B, K] of logits (global crops first); teacher_probs: 2 arrays [B, K].
  """
  total, terms = 0.0, 0
  logp = [jax.nn.log_softmax(s.astype(jnp.float32) / student_temp, axis=-1) for s in student]
  for iq, q in enumerate(teacher_probs):
    for v, lp in enumerate(logp):
      if v == iq:  # the student and the teacher never see the same view
        continue
      total = total + jnp.mean(jnp.sum(-q * lp, axis=-1))
      terms += 1
  return total / terms


# A teacher is reported collapsed when one image's output is within 3% of the uniform entropy
# ln K (every image: no signal), or the batch-mean output within 3% of 0 (every image: one
# prototype). docs/results.md (issue 32): collapsed runlocal runs sat at ln K from step ~50-100.
COLLAPSE_MARGIN = 0.03


def collapse_warning(
  metrics: dict[str, Any], num_prototypes: int, suffixes: Sequence[str] = ('',)
) -> str | None:
  """One line naming each collapsed teacher (metrics of :func:`collapse_metrics`, '/<suffix>'
  per model), or None."""
  ln_k, found = float(np.log(num_prototypes)), []
  for suffix in suffixes:
    tag = f'/{suffix}' if suffix else ''
    h, hb = float(metrics[f'teacher_entropy{tag}']), float(metrics[f'teacher_batch_entropy{tag}'])
    who = f'the {suffix} teacher' if suffix else 'the teacher'
    if h >= (1 - COLLAPSE_MARGIN) * ln_k:
      found.append(
        f'{who} gives every image the uniform output (entropy {h:.2f}, ln K = {ln_k:.2f})'
      )
    elif hb <= COLLAPSE_MARGIN * ln_k:
      found.append(f'{who} gives every image the same prototype (batch entropy {hb:.2f})')
  if not found:
    return None
  return (
    '; '.join(found) + ': the teacher has collapsed and the student learns nothing from it '
    '(lower the lr, a slower teacher momentum, a lower teacher temperature; docs/results.md)'
  )


def sinkhorn_knopp(logits: Array, teacher_temp: Array, iterations: int = 3) -> Array:
  """DINOv2's teacher centering (``sinkhorn_knopp_teacher``): exp(logits / T) normalised
  alternately so that every prototype gets 1/K of the batch's mass and every image 1/B, then
  rows scaled to sum to 1. logits [B, K] over the global batch (jit's global arrays; DINOv2
  all-reduces the same sums); returns [B, K] probabilities.

  Computed in the log domain (the same normalisations as logsumexps): DINOv2's exp underflows
  to 0 for a whole prototype once a head's logits span more than ~100 T (MOKD's search heads at
  T 0.02), and its normalisation then divides 0 by 0."""
  b, k = logits.shape
  lq = (logits / teacher_temp).T  # [K, B]
  lq = lq - jax.nn.logsumexp(lq)
  for _ in range(iterations):
    lq = lq - jax.nn.logsumexp(lq, axis=1, keepdims=True) - jnp.log(k)
    lq = lq - jax.nn.logsumexp(lq, axis=0, keepdims=True) - jnp.log(b)
  return jnp.exp(lq + jnp.log(b)).T


CENTERINGS = ('center', 'sinkhorn')


def teacher_probs(
  teacher: Array, center: Array, teacher_temp: Array, centering: str = 'center'
) -> Array:
  """The teacher's targets [B, K] from its logits: DINO's softmax((t - center) / T) or DINOv2's
  Sinkhorn-Knopp (which needs no center)."""
  t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  if centering == 'sinkhorn':
    return sinkhorn_knopp(t, teacher_temp)
  if centering != 'center':
    raise ValueError(f'centering must be one of {CENTERINGS}, not {centering!r}')
  return jax.nn.softmax((t - center) / teacher_temp, axis=-1)


def dino_loss(
  student: Sequence[Array],
  teacher: Sequence[Array],
  center: Array,
  teacher_temp: Array,
  student_temp: float = 0.1,
  center_momentum: float = 0.9,
  centering: str = 'center',
) -> tuple[Array, Array]:
  """DINOLoss: (loss, new center). student: n_crops [B, K]; teacher: 2 [B, K] logits; center [1, K].

  Teacher probabilities are centred, sharpened and detached (:func:`teacher_probs`); the new
  center is ``m * center + (1 - m) * mean(teacher logits over the global batch and both views)``
  (kept with Sinkhorn-Knopp too, which does not read it).
  """
  t = jax.lax.stop_gradient(jnp.concatenate(teacher).astype(jnp.float32))
  probs = jnp.split(teacher_probs(t, center, teacher_temp, centering), len(teacher))
  loss = dino_cross_entropy(student, probs, student_temp)
  new_center = center * center_momentum + t.mean(axis=0, keepdims=True) * (1 - center_momentum)
  return loss, new_center


def collapse_metrics(
  teacher: Array, center: Array, teacher_temp: Array, centering: str = 'center'
) -> dict[str, Array]:
  """The DINO paper's two collapse signals (its Fig. 7), from the teacher logits [B, K] of a step.

  'teacher_entropy': mean entropy of one image's centred, sharpened teacher output (ln K: every
  image gets the uniform output); 'teacher_batch_entropy': entropy of the batch-mean output (0:
  every image gets the same prototype). A healthy run keeps the first well below ln K and the
  second near it.
  """
  p = teacher_probs(teacher, center, teacher_temp, centering)
  mean_p = p.mean(0)
  return {
    'teacher_entropy': -jnp.sum(p * jnp.log(p + 1e-30), axis=-1).mean(),
    'teacher_batch_entropy': -jnp.sum(mean_p * jnp.log(mean_p + 1e-12)),
  }


# --- the optimizer ---------------------------------------------------------------------------------


def decays(path: str, leaf: Any) -> bool:
  """DINO's ``get_params_groups``: decay everything but biases and 1-D parameters."""
  return not path.endswith('bias') and np.ndim(leaf) > 1


def dino_optimizer(
  kind: str,
  lr: Callable[[Array], Array] | dict[str, Callable[[Array], Array]],
  weight_decay: Callable[[Array], Array] | dict[str, Callable[[Array], Array]],
  *,
  group: Callable[[str], str] | None = None,
  clip: float = 0.0,
  freeze_last_layer_steps: int = 0,
  frozen: str | None = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  momentum: float = 0.9,
  decay_all: Callable[[str], bool] | None = None,
) -> optax.GradientTransformation:
  """torch AdamW / SGD (momentum, coupled weight decay) as DINO steps them, composed in optax from
  moma_jax.optim's pieces.

  Args:
    kind: 'adamw' or 'sgd'.
    lr, weight_decay: schedules of the step, or dicts of them by parameter group.
    group: parameter path -> group name (needed with dict schedules).
    clip: > 0 scales each parameter's gradient to norm <= clip (DINO's per-tensor clipping).
    freeze_last_layer_steps: parameters whose path contains 'last_layer' get no update (and no
      optimizer-state change, so their Adam bias correction starts later, as torch's per-parameter
      step) while step < this.
    frozen: regex over parameter paths never updated (``norm_last_layer``'s weight_g).
    decay_all: path -> True for parameters decayed even if 1-D / biases (MOKD's search-head
      group, which the official code puts in a group with weight decay on every parameter).
  """
  grouped = isinstance(lr, dict)
  frozen_re = re.compile(frozen) if frozen else None
  hold = freeze_last_layer_steps

  def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
      lambda p, x: decays(path_str(p), x) or bool(decay_all and decay_all(path_str(p))), params
    )

  def rule(name: str, shift: int) -> optax.GradientTransformation:
    # A held group's update count starts at step ``shift``: its schedules are read from there.
    at = lambda s: (lambda c: s(c + shift)) if shift else s  # noqa: E731
    pick = lambda s: s[name] if grouped else s  # noqa: E731
    return optim.update_rule(
      kind, at(pick(lr)), at(pick(weight_decay)), decay_mask=decay_mask, b1=b1, b2=b2, eps=eps,
      momentum=momentum,
    )  # fmt: skip

  transforms = {'frozen': optax.set_to_zero()}
  for name in sorted(lr) if grouped else ['all']:
    transforms[name] = rule(name, 0)
    if hold > 0:  # DINO's cancel_gradients_last_layer: no update, no state change
      transforms[f'{name}/last_layer'] = optax.transforms.conditionally_mask(
        rule(name, hold), lambda count: count >= hold
      )

  def label(path: str) -> str:
    if frozen_re and frozen_re.search(path):
      return 'frozen'
    name = group(path) if grouped else 'all'
    return f'{name}/last_layer' if hold > 0 and 'last_layer' in path else name

  tx = optim.by_path(transforms, label)
  return optax.chain(optim.clip_per_tensor(clip), tx) if clip > 0 else tx


def schedules(o, batch_size: int, total_steps: int, steps_per_epoch: int):
  """(lr schedule, weight-decay schedule, peak lr) from a config.optim of the DINO kind: base_lr
  (per 256 images), min_lr, warmup_epochs (or warmup_steps), weight_decay -> weight_decay_end."""
  peak = o.base_lr * batch_size / 256
  warmup = o.warmup_steps or int(o.warmup_epochs * steps_per_epoch)
  lr = cosine_schedule(peak, o.min_lr, total_steps, warmup)
  wd = cosine_schedule(o.weight_decay, o.get('weight_decay_end', o.weight_decay), total_steps)
  return lr, wd, peak


def optimizer_from_config(o, batch_size: int, total_steps: int, steps_per_epoch: int, **kw):
  """(tx, lr schedule, peak lr) from a config.optim of the DINO kind (:func:`schedules`, and
  name, grad_clip, freeze_last_layer in epochs, b1, b2, momentum). ``kw`` goes to
  :func:`dino_optimizer`, and may replace the schedules by dicts of them per parameter group."""
  lr, wd, peak = schedules(o, batch_size, total_steps, steps_per_epoch)
  kw = {'lr': lr, 'weight_decay': wd, **kw}
  tx = dino_optimizer(
    o.name, clip=o.grad_clip, b1=o.b1, b2=o.b2, momentum=o.get('momentum', 0.9),
    freeze_last_layer_steps=int(o.get('freeze_last_layer', 0) * steps_per_epoch), **kw,
  )  # fmt: skip
  return tx, lr, peak


# --- encoding multi-crop views ---------------------------------------------------------------------


def vit_at_size(model: ViT, params: dict[str, Any], size: int) -> tuple[ViT, dict[str, Any]]:
  """The ViT and parameters for ``size`` px inputs: position embeddings of the patch grid resized
  as DINO's ``interpolate_pos_encoding`` does (CLS row kept); the gradient flows back to the
  original table."""
  if size == model.image_size:
    return model, params
  if size % model.patch_size:
    raise ValueError(f'crop size {size} is not a multiple of the patch size {model.patch_size}')
  pos = params['pos_embed']
  grid = resample_pos_grid(pos[:, 1:], size // model.patch_size)
  return model.clone(image_size=size), {
    **params,
    'pos_embed': jnp.concatenate([pos[:, :1], grid], 1),
  }


def encode(
  model, params, bn, images: Array, *, train: bool, rng: Array | None = None
) -> tuple[Array, Array, Any]:
  """One multi-crop group (crops of one size, stacked) -> (feature [B, D], tokens / map, new bn).

  ViT: (CLS after the final norm, patch tokens [B, N, D]); ResNet: (pooled, layer-4 map
  [B, h, w, C]); BatchNorm in training mode (batch statistics; running ones updated) for ResNets
  when ``train``.
  """
  if isinstance(model, resnet.ResNet):
    variables = {'params': params, 'batch_stats': bn}
    if train:
      (pooled, aux), new = model.apply(variables, images, train=True, mutable=['batch_stats'])
      return pooled, aux['feature_map'], new['batch_stats']
    pooled, aux = model.apply(variables, images)
    return pooled, aux['feature_map'], bn
  m, p = vit_at_size(model, params, images.shape[1])
  rngs = {'dropout': rng} if (train and rng is not None) else {}
  tokens, _ = m.apply({'params': p}, images, train=train, rngs=rngs)
  return tokens[:, 0], tokens[:, 1:], bn


def init_backbone(model, rng: Array, start: Any | None = None) -> tuple[Any, Any]:
  """(params, batch_stats or {}) of a backbone; a ViT's position embeddings and CLS token start as
  DINO's (trunc-normal 0.02, learned) instead of the fixed sin-cos table of MAE / MoCo v3."""
  if isinstance(model, resnet.ResNet):
    v = model.init(rng, jnp.zeros((1, 32, 32, model.channels)))
    params, bn = v['params'], v['batch_stats']
    if start is not None:
      params, bn = start['params'], start['batch_stats']
    return params, bn
  v = model.init(rng, jnp.zeros((1, model.image_size, model.image_size, model.channels)))
  params = dict(v['params'])
  k_pos, k_cls = jax.random.split(jax.random.fold_in(rng, 7))
  tn = jax.nn.initializers.truncated_normal(0.02)
  params['pos_embed'] = tn(k_pos, params['pos_embed'].shape)
  params['cls_token'] = tn(k_cls, params['cls_token'].shape)
  if start is not None:
    params = start['params'] if 'params' in start else start
  return params, {}


def backbone_flops(model, size: int) -> float:
  if isinstance(model, resnet.ResNet):
    return resnet.forward_flops(model, size)
  return flops.vit_flops(model, (size // model.patch_size) ** 2)


def check_multicrop(
  views: dict[str, Any], global_views: Sequence[str], local_views: Sequence[str], model, what: str
) -> tuple[int, int | None]:
  """(global size, local size) of the views, or a one-line ValueError: crops of one kind must
  share a size, and a ViT's crops must be multiples of its patch size. ``views``: name -> ViewSpec."""
  missing = [v for v in (*global_views, *local_views) if v not in views]
  if missing:
    raise ValueError(f'{what}: data.views lacks {missing} (multi-crop: {len(local_views)} local)')
  sizes = {}
  for kind, names in (('global', global_views), ('local', local_views)):
    got = {n: views[n].size for n in names}
    if len(set(got.values())) > 1:
      raise ValueError(
        f'{what}: mismatched {kind} crop sizes {got}; every {kind} crop must have the same size'
      )
    sizes[kind] = next(iter(got.values()), None)
  if isinstance(model, ViT):
    for kind, s in sizes.items():
      if s is not None and s % model.patch_size:
        raise ValueError(
          f'{what}: {kind} crop size {s} is not divisible by the patch size {model.patch_size}'
        )
    if sizes['global'] != model.image_size:
      raise ValueError(
        f'{what}: global crops are {sizes["global"]}px but the ViT is built for '
        f'{model.image_size}px (data.image_size)'
      )
  return sizes['global'], sizes['local']


def crops_note(n_global: int, g_size: int, n_local: int, l_size: int | None) -> str:
  """'2 x 224px + 8 x 96px crops' (or '2 x 32px crops' without local crops), for the run log."""
  local = f' + {n_local} x {l_size}px' if n_local else ''
  return f'{n_global} x {g_size}px{local} crops'


def view_names(num_local: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
  return ('global1', 'global2'), tuple(f'local{i + 1}' for i in range(num_local))


# --- the objective ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dino(Objective):
  """DINO for a ViT (``vit.ViT``) or a ResNet (``resnet.ResNet``) backbone.

  params: {'backbone', 'head'}; extra: {'teacher': {'backbone', 'head'}, 'center' [1, K],
  'step', and for ResNets 'student_bn' / 'teacher_bn' (BatchNorm statistics)}.
  k-NN features and exports are the teacher's (DINO evaluates and releases its teacher).
  """

  backbone: Any
  head: DinoHead
  total_steps: int
  steps_per_epoch: int
  num_local: int = 8
  student_temp: float = 0.1
  teacher_temp: float = 0.07
  warmup_teacher_temp: float = 0.04
  warmup_teacher_temp_epochs: int = 30
  center_momentum: float = 0.9
  centering: str = 'center'  # or 'sinkhorn' (DINOv2's teacher centering)
  base_momentum: float = 0.996
  norm_last_layer: bool = True
  global_size: int = 224
  local_size: int = 96
  input_norm: Normalization = IMAGENET

  torch_format = 'dino'

  @property
  def frozen_pattern(self) -> str | None:
    return r'^head/last_layer/weight_g$' if self.norm_last_layer else None

  @property
  def views(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return view_names(self.num_local)

  def required_views(self) -> set[str]:
    g, loc = self.views
    return set(g) | set(loc)

  def init(self, rng: Array, start: Any | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    k_b, k_h = jax.random.split(rng)
    backbone, bn = init_backbone(self.backbone, k_b, start)
    head = self.head.init(k_h, jnp.zeros((1, self._feature_dim())))['params']
    params = {'backbone': backbone, 'head': head}
    extra = {
      'teacher': params,  # DINO: the teacher starts as a copy of the student
      'center': jnp.zeros((1, self.head.out_dim), jnp.float32),
      'step': jnp.zeros((), jnp.int32),
    }
    if bn:
      extra['student_bn'], extra['teacher_bn'] = bn, bn
    return params, extra

  def _feature_dim(self) -> int:
    return (
      self.backbone.out_dim if isinstance(self.backbone, resnet.ResNet) else self.backbone.width
    )

  def momentum(self, step: Array) -> Array:
    # DINO updates the teacher after step i with momentum_schedule[i]; the teacher used at step t
    # is therefore m[t - 1] * teacher + (1 - m[t - 1]) * student_t.
    return ema.cosine_momentum(jnp.maximum(step - 1, 0), self.total_steps, self.base_momentum)

  def temperature(self, step: Array) -> Array:
    return teacher_temperature(
      step, self.steps_per_epoch, self.warmup_teacher_temp, self.teacher_temp,
      self.warmup_teacher_temp_epochs,
    )  # fmt: skip

  def loss(self, params, extra, frozen, batch, rng):
    del frozen
    step = extra['step']
    m = self.momentum(step)
    teacher = ema.ema_update(extra['teacher'], params, m)
    new = dict(extra, teacher=teacher, step=step + 1)
    g_names, l_names = self.views
    k_g, k_l = jax.random.split(rng)
    globals_ = self.input_norm(jnp.concatenate([batch[v] for v in g_names]))
    s_bn = extra.get('student_bn', {})
    feat, _, s_bn = encode(self.backbone, params['backbone'], s_bn, globals_, train=True, rng=k_g)
    student = [self.head.apply({'params': params['head']}, feat)]
    if l_names:
      locals_ = self.input_norm(jnp.concatenate([batch[v] for v in l_names]))
      feat_l, _, s_bn = encode(
        self.backbone, params['backbone'], s_bn, locals_, train=True, rng=k_l
      )
      student.append(self.head.apply({'params': params['head']}, feat_l))
    # The teacher: train-mode BatchNorm (DINO never switches it to eval), no drop path.
    is_cnn = isinstance(self.backbone, resnet.ResNet)
    t_feat, _, t_bn = encode(
      self.backbone, teacher['backbone'], extra.get('teacher_bn', {}), globals_, train=is_cnn
    )
    t_out = self.head.apply({'params': teacher['head']}, jax.lax.stop_gradient(t_feat))
    n_crops = 2 + len(l_names)
    s_views = jnp.split(jnp.concatenate(student), n_crops)
    temp = self.temperature(step)
    loss, new['center'] = dino_loss(
      s_views, jnp.split(t_out, 2), extra['center'], temp, self.student_temp,
      self.center_momentum, self.centering,
    )  # fmt: skip
    if 'student_bn' in extra:
      new['student_bn'], new['teacher_bn'] = s_bn, jax.lax.stop_gradient(t_bn)
    metrics = {'loss': loss, 'momentum': m, 'teacher_temp': temp}
    metrics.update(collapse_metrics(t_out, extra['center'], temp, self.centering))
    return loss, (metrics, new)

  progress_metrics = (
    ('H_entropy', 'teacher_entropy'),
    ('H_batch_entropy', 'teacher_batch_entropy'),
  )

  def collapse(self, metrics) -> str | None:
    return collapse_warning(metrics, self.head.out_dim)

  def features(self, params, extra, frozen, images: Array, pool: str = 'cls') -> Array:
    del params, frozen, pool  # the backbone's own feature (ViT CLS / ResNet pooled), as DINO's
    x = self.input_norm(images)
    feat, _, _ = encode(
      self.backbone, extra['teacher']['backbone'], extra.get('teacher_bn', {}), x, train=False
    )
    return feat.astype(jnp.float32)

  def make_optimizer(self, config, total_steps: int, steps_per_epoch: int):
    return optimizer_from_config(
      config.optim, config.batch_size, total_steps, steps_per_epoch, frozen=self.frozen_pattern
    )

  def export(self, params, extra):
    del params
    t = extra['teacher']
    enc_vars = {'params': t['backbone']}
    if 'teacher_bn' in extra:
      enc_vars['batch_stats'] = extra['teacher_bn']
    return {
      'encoder': (self.backbone, enc_vars, None),
      'head': (self.head, {'params': t['head']}, self._feature_dim()),
    }

  def flops_per_example(self) -> float:
    g = backbone_flops(self.backbone, self.global_size)
    loc = backbone_flops(self.backbone, self.local_size) if self.num_local else 0.0
    # student fwd + bwd (3x) on every crop, teacher fwd on the two global crops; heads left out
    return 3 * (2 * g + self.num_local * loc) + 2 * g
