"""The one trainer: config -> sharded state -> jitted update loop -> checkpoints, metrics, exports.

Stages of ``train_and_evaluate``:
  1. validate the config and build everything cheap (mesh, batch split, models, teachers, data
     sources) so bad input fails before any compilation or data reading;
  2. create the train state directly sharded (eval_shape -> shardings -> jit(init));
  3. restore the latest checkpoint of the workdir, if any (state + data stream position);
  4. loop: one jitted, donated update of (state, frozen teachers, batch, rng) per step; metrics,
     periodic k-NN evaluation, periodic checkpoints;
  5. final checkpoint, export of the student (orbax + PyTorch), final evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from moma_jax import checkpointing, flops, optim, sharding
from moma_jax.data import device, pipeline, sources
from moma_jax.data.mixing import normalize
from moma_jax.evaluators.knn import KnnEvaluator
from moma_jax.models import pretrained, vit
from moma_jax.objectives.moma import Moma, Teacher


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


class NonFiniteError(FloatingPointError):
  """A loss or gradient norm that is NaN or infinite."""


# --- building the objective ------------------------------------------------------------------------


def _dtype(name: str):
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {name!r}")
  return jnp.dtype(name)


def _encoder(loaded: pretrained.Pretrained, what: str) -> vit.ViT:
  m = loaded.model
  if m.num_classes or m.pool != 'cls':
    raise ValueError(
      f'{what} is a classifier (pool={m.pool}, {m.num_classes} classes); MOMA needs an encoder '
      '(a pre-trained MAE / MoCo v3 checkpoint, not a fine-tuned one)'
    )
  return m


def build_moma(config: ml_collections.ConfigDict) -> tuple[Moma, dict[str, Any], Any, list[str]]:
  """(objective, teacher variables, pre-trained student params or None, notes for the log)."""
  size = config.data.image_size
  notes = []
  sc = config.student
  if sc.checkpoint:
    loaded = pretrained.load_pretrained(
      sc.checkpoint, dtype=_dtype(sc.dtype), drop_path=sc.drop_path
    )
    student = _encoder(loaded, f'student checkpoint {sc.checkpoint}')
    student_params = loaded.params['params']
    notes.append(f'student: {sc.checkpoint} ({loaded.metadata.get("variant")})')
  else:
    student = vit.ViT(
      **vit.decode_variant(sc.variant).kwargs(),
      image_size=size,
      dtype=_dtype(sc.dtype),
      drop_path=sc.drop_path,
    )
    student_params = None
    notes.append(f'student: randomly initialised {sc.variant}')
  if student.image_size != size:
    raise ValueError(
      f'the student takes {student.image_size}px images but data.image_size={size}; '
      'make them agree (convert with --image-size to resample position embeddings)'
    )
  teachers, frozen = {}, {}
  for name, tc in config.teachers.items():
    if tc.checkpoint:
      loaded = pretrained.load_pretrained(tc.checkpoint, dtype=_dtype(config.teacher_dtype))
      model = _encoder(loaded, f'teacher {name} checkpoint {tc.checkpoint}')
      frozen[name] = loaded.params
      source = tc.checkpoint
    else:
      model = vit.ViT(
        **vit.decode_variant(tc.variant).kwargs(),
        image_size=size,
        dtype=_dtype(config.teacher_dtype),
      )
      key = jax.random.fold_in(jax.random.key(config.seed + 1), len(teachers))
      frozen[name] = jax.jit(model.init)(key, jnp.zeros((1, size, size, 3)))
      source = 'random'
      notes.append(
        f'teacher {name}: RANDOMLY INITIALISED {tc.variant} (no checkpoint given): this run '
        'exercises the code, it does not distil a real self-supervised teacher'
      )
    teachers[name] = Teacher(model, tc.weight, tc.student_view, source)
    if source != 'random':
      notes.append(f'teacher {name}: {source}, weight {tc.weight}, student view {tc.student_view}')
  m = config.moma
  objective = Moma(
    student=student,
    teachers=teachers,
    mask_ratio=m.mask_ratio,
    align=m.align,
    teacher_norm=m.teacher_norm,
    smooth_l1_beta=m.smooth_l1_beta,
    per_teacher_projector=m.per_teacher_projector,
    mask_teacher=m.mask_teacher,
    mask_strong_view=m.mask_strong_view,
  )
  return objective, frozen, student_params, notes


# --- the update ------------------------------------------------------------------------------------


def _norm(tree) -> jax.Array:
  return optax.global_norm(tree)


def make_train_step(objective: Moma, tx: optax.GradientTransformation, schedule):
  """Pure update: (state, frozen, batch, rng) -> (state, metrics). rng is the run's base key."""

  def step(state: TrainState, frozen, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, frozen, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      **metrics,
      'grad_norm': _norm(grads),
      'param_norm': _norm(params),
      'update_norm': _norm(updates),
      'lr': schedule(state.step),
    }
    return TrainState(state.step + 1, params, opt_state), metrics

  return step


def create_state(objective: Moma, tx, mesh, rules, rng, student_params=None):
  """The train state, created directly sharded. Returns (state, shardings, abstract state)."""

  def init_state(key, student):
    params = objective.init(key, student)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

  abstract = jax.eval_shape(init_state, rng, student_params)
  state_sharding = sharding.infer_shardings(abstract, mesh, rules)
  state = jax.jit(init_state, out_shardings=state_sharding)(rng, student_params)
  return state, state_sharding, abstract


def jit_train_step(objective: Moma, tx, schedule, mesh, state_sharding, frozen_sharding):
  """The update, jitted with explicit shardings and the state's buffers donated."""
  repl = sharding.replicated(mesh)
  return jax.jit(
    make_train_step(objective, tx, schedule),
    in_shardings=(
      state_sharding,
      frozen_sharding,
      device.batch_sharding(mesh, sharding.data_axes(mesh)),
      repl,
    ),
    out_shardings=(state_sharding, repl),
    donate_argnums=(0,),
  )


# --- helpers ---------------------------------------------------------------------------------------


def student_features(objective: Moma):
  """(params, uint8 images) -> CLS features of the student on the full image."""

  def fn(params, images):
    tokens, _ = objective.student.apply({'params': params['student']}, normalize(images))
    return tokens[:, 0].astype(jnp.float32)

  return fn


def teacher_features(model: vit.ViT):
  def fn(variables, images):
    tokens, _ = model.apply(variables, normalize(images))
    return tokens[:, 0].astype(jnp.float32)

  return fn


def pixel_features(params, images):
  del params
  return images.reshape(images.shape[0], -1).astype(jnp.float32)


def _check_finite(step: int, metrics: dict[str, Any]) -> None:
  for name in ('loss', 'grad_norm'):
    value = float(metrics[name])
    if not np.isfinite(value):
      raise NonFiniteError(
        f'non-finite {name} ({value}) at step {step}; no checkpoint was written for it. '
        'Lower the learning rate, enable optim.grad_clip, or check the input data'
      )


def export_student(objective: Moma, params: Any, workdir: str, metadata: dict[str, Any]) -> str:
  """Writes workdir/export/student (a converted-checkpoint directory) and student.pth."""
  from convert.convert import export_checkpoint

  s = objective.student
  kwargs = {
    f.name: getattr(s, f.name)
    for f in dataclasses.fields(vit.ViT)
    if f.name not in ('parent', 'name', 'dtype', 'attention_impl', 'drop_path')
  }
  spec = pretrained.ComponentSpec('ViT', kwargs)
  out = os.path.join(workdir, 'export', 'student')
  host = sharding.to_host(params['student'])
  if jax.process_index() == 0:
    meta = {
      **metadata,
      'format': 'moma_jax',
      'mean': list(pretrained.IMAGENET_MEAN),
      'std': list(pretrained.IMAGENET_STD),
      'image_size': s.image_size,
      'patch_size': s.patch_size,
      'variant': vit.name_variant(s.width, s.depth, s.num_heads, s.patch_size),
    }
    pretrained.save_pretrained(
      out, {'encoder': spec}, {'encoder': {'params': host}}, meta, overwrite=True
    )
    export_checkpoint(out, os.path.join(workdir, 'export', 'student.pth'), overwrite=True)
  return out


# --- the loop --------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) a MOMA distillation in ``workdir``; returns the final metrics."""
  # 1. Everything cheap and checkable first.
  mesh = sharding.make_mesh(dict(config.mesh))
  data_axes = sharding.data_axes(mesh)
  per_host_batch = device.check_batch_size(config.batch_size, mesh, data_axes)
  objective, frozen, student_params, notes = build_moma(config)
  views = pipeline.views_from_config(config.data.views)
  missing_views = objective.required_views() - set(views)
  if missing_views:
    raise ValueError(f'data.views lacks {sorted(missing_views)}, which the teachers need')
  for v in views.values():
    if v.size != config.data.image_size:
      raise ValueError(f'every view must be data.image_size={config.data.image_size}px')
  train_src = sources.open_split(
    config.data.name,
    config.data.train_split,
    data_dir=config.data.data_dir,
    manual_dir=config.data.manual_dir,
  )
  steps_per_epoch = max(1, train_src.total_examples // config.batch_size)
  total_steps = config.num_train_steps or int(config.num_epochs * steps_per_epoch)
  warmup = int(config.optim.warmup_epochs * steps_per_epoch)
  peak_lr = optim.learning_rate(config.optim.base_lr, config.batch_size)
  schedule = optim.warmup_cosine(peak_lr, warmup, total_steps, config.optim.min_lr)
  tx = optim.adamw(
    schedule,
    b1=config.optim.b1,
    b2=config.optim.b2,
    weight_decay=config.optim.weight_decay,
    grad_clip=config.optim.grad_clip,
    frozen=objective.frozen_pattern,
  )

  os.makedirs(workdir, exist_ok=True)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  for note in notes:
    logging.warning('%s', note) if 'RANDOM' in note else logging.info('%s', note)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  logging.info(
    'mesh %s, global batch %d (%d per host), %d steps (%d per epoch), peak lr %.3g',
    dict(mesh.shape),
    config.batch_size,
    per_host_batch,
    total_steps,
    steps_per_epoch,
    peak_lr,
  )

  # 2. State, created sharded.
  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)

  state, state_sharding, abstract = create_state(
    objective, tx, mesh, config.sharding_rules, init_rng, student_params
  )
  frozen_sharding = sharding.infer_shardings(frozen, mesh, config.teacher_sharding_rules)
  frozen = jax.device_put(frozen, frozen_sharding)
  del student_params

  # 3. Resume.
  ckpt = checkpointing.Checkpointer(
    os.path.join(workdir, 'checkpoints'), keep=config.keep_checkpoints
  )
  start_index = 0
  latest = ckpt.latest_step()
  if latest is not None:
    abstract_sharded = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
    )
    state, extra = ckpt.restore(latest, abstract_sharded)
    start_index = int(extra['data_index'][jax.process_index()])
    logging.info('resumed from step %d (data position %d)', latest, start_index)
  step = int(state.step)

  # 4. The loop.
  batch_sharding = device.batch_sharding(mesh, data_axes)
  train_iter = pipeline.train_iterator(
    train_src,
    views,
    batch_size=per_host_batch,
    seed=config.seed,
    start_index=start_index,
    shuffle_buffer=config.data.shuffle_buffer,
    process_index=jax.process_index(),
  )

  def host_batches():
    for batch in train_iter:
      yield (
        {k: v for k, v in batch.items() if k in objective.required_views()},
        train_iter.next_index,
      )

  def device_batches():
    pending = []
    for batch, index in host_batches():
      pending.append((device.make_global(batch, batch_sharding), index))
      if len(pending) > 1:  # one batch in flight: its transfer overlaps the running step
        yield pending.pop(0)
    yield from pending

  train_step = jit_train_step(objective, tx, schedule, mesh, state_sharding, frozen_sharding)
  evaluator = None
  if config.eval.knn_every or config.eval.knn_at_end:
    evaluator = KnnEvaluator(
      dataset=config.data.name,
      train_split=config.eval.knn_train_split,
      eval_split=config.eval.knn_eval_split,
      image_size=config.data.image_size,
      batch_size=config.eval.batch_size,
      mesh=mesh,
      data_axes=data_axes,
      data_dir=config.data.data_dir,
      max_train_examples=config.eval.knn_max_train or None,
      resize_ratio=config.data.eval_resize_ratio,
    )
  flops_per_step = objective.flops_per_example() * config.batch_size
  peak = flops.peak_flops(jax.devices()[0].device_kind)
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)

  def data_index_all() -> list[int]:
    return [int(i) for i in multihost_utils.process_allgather(np.int64(data_index))]

  def save(at_step: int):
    ckpt.save(at_step, state, {'data_index': data_index_all(), 'config_name': config.name})

  history: list[dict[str, float]] = []
  prev_metrics = None
  data_index = start_index
  t_log, steps_since_log = time.perf_counter(), 0
  batches = device_batches()
  stop = min(total_steps, config.stop_at_step or total_steps)
  while step < stop:
    batch, next_index = next(batches)
    state, metrics = train_step(state, frozen, batch, train_rng)
    if prev_metrics is not None:  # checked one step late, so the host never stalls the device
      _check_finite(step - 1, prev_metrics)
    prev_metrics = metrics
    step += 1
    data_index = next_index
    steps_since_log += 1
    report(step)
    if step % config.log_every == 0 or step == total_steps:
      m = jax.device_get(metrics)
      _check_finite(step, m)
      dt = time.perf_counter() - t_log
      scalars = {k: float(v) for k, v in m.items()}
      scalars['images_per_sec'] = steps_since_log * config.batch_size / dt
      if peak:
        scalars['mfu'] = flops_per_step * steps_since_log / dt / (peak * jax.device_count())
      writer.write_scalars(step, scalars)
      history.append({'step': step, **scalars})
      t_log, steps_since_log = time.perf_counter(), 0
    if evaluator and config.eval.knn_every and step % config.eval.knn_every == 0:
      writer.write_scalars(step, dict(evaluator.run(student_features(objective), state.params)))
    if step % config.checkpoint_every == 0 and step < stop:
      _check_finite(step, jax.device_get(metrics))
      save(step)

  # 5. Final save, export, evaluation.
  if prev_metrics is not None:
    _check_finite(step, jax.device_get(prev_metrics))
  if latest != step:
    save(step)
  ckpt.wait()
  if step < total_steps:  # stop_at_step: leave as if preempted, to be resumed
    ckpt.close()
    return {'step': step}
  export_student(objective, state.params, workdir, {'config': config.name, 'steps': step})
  final = {'step': step, **(history[-1] if history else {})}
  if evaluator and config.eval.knn_at_end:
    results = dict(evaluator.run(student_features(objective), state.params, 'knn/student'))
    if config.eval.knn_teachers:
      for name, t in objective.teachers.items():
        results.update(
          evaluator.run(teacher_features(t.model), frozen[name], f'knn/teacher_{name}')
        )
      results.update(evaluator.run(pixel_features, None, 'knn/raw_pixels'))
    writer.write_scalars(step, results)
    final.update(results)
    logging.info(
      'k-NN top-1 (k=20): %s',
      ', '.join(f'{k.split("/", 1)[1]} {100 * v:.1f}%' for k, v in results.items()),
    )
  writer.flush()
  ckpt.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
      json.dump({'final': final, 'history': history}, f, indent=1)
  return final
