"""Optimizers and schedules, all optax: torch's AdamW and SGD update rules with constant or scheduled
lr and weight decay (:func:`update_rule`), parameter groups by path (:func:`by_path`), the MAE
weight-decay rule, frozen parameters, per-tensor gradient clipping, and layer-wise lr decay.

The MAE-family objectives build theirs with :func:`adamw` (train.make_optimizer); DINO and MOKD
compose the same pieces with their own schedules and groups (objectives/dino.py: dino_optimizer)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[Any], Any] | float

NO_DECAY = re.compile(r'(^|/)(pos_embed|cls_token|mask_token|decoder_pos_embed)$')


def path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def tree_paths(tree) -> Any:
  """Same-structure tree of 'a/b/c' path strings."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), tree)


def decay_mask(params) -> Any:
  """MAE rule: weight decay on matrices only; none on biases, norms, CLS / position embeddings."""
  return jax.tree_util.tree_map_with_path(
    lambda p, x: x.ndim >= 2 and not NO_DECAY.search(path_str(p)), params
  )


def layer_id(path: str, depth: int) -> int:
  """MAE's layer ids: CLS, position and patch embeddings 0; block i -> i + 1; the rest depth + 1.
  ``path`` is a parameter path such as 'model/blocks_3/attn/qkv/kernel'."""
  name = path.split('/', 1)[1] if path.startswith('model/') else path
  if name.split('/')[0] in ('cls_token', 'pos_embed', 'patch_embed', 'mask_token'):
    return 0
  m = re.match(r'blocks_(\d+)/', name)
  if m:
    return int(m.group(1)) + 1
  return depth + 1


def layer_decay_scales(params, depth: int, decay: float) -> Any:
  """Per-parameter lr multipliers decay ** (depth + 1 - layer_id) (MAE fine-tuning)."""
  return jax.tree.map(lambda p: decay ** (depth + 1 - layer_id(p, depth)), tree_paths(params))


def learning_rate(base_lr: float, batch_size: int) -> float:
  """MAE convention: lr = base_lr * batch_size / 256."""
  return base_lr * batch_size / 256


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, end: float = 0.0):
  return optax.warmup_cosine_decay_schedule(
    0.0, peak, max(warmup_steps, 0), max(total_steps, warmup_steps + 1), end_value=end
  )


def adamw(
  schedule: Callable[[int], float] | float,
  *,
  b1: float = 0.9,
  b2: float = 0.95,
  weight_decay: float = 0.05,
  frozen: str | None = None,
  lr_scale: Callable[[Any], Any] | None = None,
  groups: Sequence[tuple[str, Callable[[int], float]]] = (),
) -> optax.GradientTransformation:
  """AdamW with the MAE decay mask (gradient clipping, when wanted, is chained in front).

  Args:
    frozen: regex over parameter paths ('student/pos_embed'); matching parameters get no update.
    lr_scale: params -> tree of per-parameter learning-rate multipliers (layer decay).
    groups: (regex, schedule) pairs: a parameter (not ``frozen``) follows the schedule of the first
      regex that matches its path, the others ``schedule``. MOMA's projector warm-up holds the
      student encoder at lr 0 while the new projectors are fitted (:func:`held_schedule`).
  """

  def chain(lr):
    return update_rule(
      'adamw', lr, weight_decay, decay_mask=decay_mask, b1=b1, b2=b2, lr_scale=lr_scale
    )

  if not frozen and not groups:
    return chain(schedule)
  patterns = [(re.compile(frozen), 'frozen')] if frozen else []
  patterns += [(re.compile(regex), f'group_{i}') for i, (regex, _) in enumerate(groups)]

  def label(path: str) -> str:
    return next((name for regex, name in patterns if regex.search(path)), 'rest')

  transforms = {'rest': chain(schedule), 'frozen': optax.set_to_zero()}
  transforms.update({f'group_{i}': chain(lr) for i, (_, lr) in enumerate(groups)})
  return by_path(transforms, label)


def update_rule(
  kind: str,
  lr: Schedule,
  weight_decay: Schedule,
  *,
  decay_mask: Callable[[Any], Any] | None = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  momentum: float = 0.9,
  lr_scale: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
  """torch's update rules in optax; ``lr`` and ``weight_decay`` are constants or schedules of the
  step (the transformation's own update count).

  'adamw': optax's AdamW, p -= lr * (adam(g) + wd * p) (decoupled decay, as torch.optim.AdamW);
  'sgd': torch SGD with momentum and coupled decay, buf = momentum * buf + g + wd * p; p -= lr * buf.
  ``decay_mask``: params -> tree of bools, which parameters decay. ``lr_scale``: params -> tree of
  per-parameter lr multipliers (layer decay).
  """
  if callable(weight_decay):  # a schedule: optax's add_decayed_weights takes a number only
    decay = optax.inject_hyperparams(optax.add_decayed_weights, static_args=('mask',))(
      weight_decay=weight_decay, mask=decay_mask
    )
  else:
    decay = optax.add_decayed_weights(weight_decay, mask=decay_mask)
  if kind == 'adamw':
    parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps), decay]
  elif kind == 'sgd':
    parts = [decay, optax.trace(decay=momentum)]
  else:
    raise ValueError(f"update rule must be 'adamw' or 'sgd', not {kind!r}")
  if lr_scale is not None:
    parts.append(_scale_by_tree(lr_scale))
  parts.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*parts)


def by_path(
  transforms: dict[str, optax.GradientTransformation], label: Callable[[str], str]
) -> optax.GradientTransformation:
  """optax.multi_transform with each parameter labelled from its path ('model/blocks_3/...')."""
  return optax.multi_transform(transforms, lambda params: jax.tree.map(label, tree_paths(params)))


def stop_frozen_gradients(params: Any, frozen: str | None) -> Any:
  """``params`` with the leaves whose path matches ``frozen`` behind stop_gradient: what PyTorch's
  requires_grad=False means (the fixed sin-cos tables, MoCo v3's patch projection, DINO's
  normalised last layer). Their gradients are then zero by construction and XLA does not compute
  them; the optimizer's set_to_zero for them alone would leave the work in the step. For a ViT's
  pos_embed that work is the scatter of the visible tokens' cotangents into [B, N, D] and its sum
  over the batch (moco_to_mae on a v5e-8, by the plan: 165 -> 163 GB per chip per step). The
  global gradient norm (logged, clipped) no longer counts them, as in PyTorch."""
  if not frozen:
    return params
  regex = re.compile(frozen)
  return jax.tree.map(
    lambda path, x: jax.lax.stop_gradient(x) if regex.search(path) else x,
    tree_paths(params),
    params,
  )


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
  """Each parameter's gradient scaled to L2 norm <= max_norm, DINO's ``clip_gradients`` (optax
  clips by the global norm or by block RMS, not by each tensor's norm)."""

  def clip(g):
    norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
    return (g * jnp.minimum(1.0, max_norm / (norm + 1e-6))).astype(g.dtype)

  return optax.stateless(lambda updates, params=None: jax.tree.map(clip, updates))


def held_schedule(
  peak: float, hold_steps: int, warmup_steps: int, total_steps: int, end: float = 0.0
):
  """lr 0 for ``hold_steps``, then the warm-up + cosine schedule over the steps that remain (the
  encoder's schedule of a linear-probe-then-fine-tune start, Kumar et al. 2022)."""
  rest = warmup_cosine(peak, warmup_steps, max(total_steps - hold_steps, 1), end)
  return optax.join_schedules([optax.constant_schedule(0.0), rest], [hold_steps])


def _scale_by_tree(fn: Callable[[Any], Any]) -> optax.GradientTransformation:
  """Multiplies updates by a fixed per-parameter tree computed from the params (layer decay)."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    scales = fn(updates)
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(init, update)
