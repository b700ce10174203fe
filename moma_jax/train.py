"""The one trainer: config -> sharded state -> jitted update loop -> checkpoints, metrics, exports.

Any objective (MOMA distillation, fine-tuning, linear probing, ...) plugs in; see
``moma_jax/objectives/__init__.py`` for the interface. Stages of ``train_and_evaluate``:
  1. validate the config and build everything cheap (mesh, batch split, models, teachers, data
     sources) so bad input fails before any compilation or data reading;
  2. create the train state directly sharded (eval_shape -> shardings -> jit(init));
  3. restore the latest checkpoint of the workdir, if any (state + data stream position); a fresh
     run instead lets the objective prepare its parameters on the first batches (``prepare``);
  4. loop: one jitted, donated update of (state, frozen, batch, rng) per step; metrics, periodic
     evaluations, periodic checkpoints;
  5. final checkpoint, export of the trained ViT (orbax + PyTorch), final evaluations.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

# isort: split
# TensorFlow quietly, and without the Keras that clu's TensorBoard writer would load (tf_quiet.py).
from moma_jax.data import tf_quiet  # noqa: F401

# isort: split
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moma_jax import (
  builders,
  checkpointing,
  hardware,
  images,
  optim,
  sharding,
  storage,
  summary,
  validate,
)
from moma_jax.data import device, photometric, pipeline, sources
from moma_jax.evaluators.classification import ClassificationEvaluator
from moma_jax.evaluators.knn import KnnEvaluator, encoder_features, pixel_features
from moma_jax.models import pretrained, resnet, vit
from moma_jax.objectives import registry


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # trained by the optimizer
  extra: Any  # updated by the objective itself (BatchNorm statistics, ...)
  opt_state: Any
  skipped: jax.Array  # steps whose update was dropped as non-finite (skip_nonfinite)


class NonFiniteError(FloatingPointError):
  """A loss or gradient norm that is NaN or infinite."""


# --- the update ------------------------------------------------------------------------------------


def make_train_step(
  objective, tx: optax.GradientTransformation, schedule, skip_nonfinite=False, augment=None
):
  """Pure update: (state, frozen, batch, rng) -> (state, metrics). rng is the run's base key.

  With ``skip_nonfinite`` a step whose loss or gradients are not finite leaves parameters,
  optimizer and objective state unchanged and is counted in ``state.skipped``. ``augment``
  (batch -> batch, e.g. photometric.make_batch_fn) runs on the batch first, on device.
  """

  def step(state: TrainState, frozen, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    if augment is not None:
      batch = augment(batch)
    grad_fn = jax.value_and_grad(
      lambda p, *a: objective.loss(optim.stop_frozen_gradients(p, objective.frozen_pattern), *a),
      has_aux=True,
    )
    (loss, (metrics, extra)), grads = grad_fn(state.params, state.extra, frozen, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    skipped = state.skipped
    if skip_nonfinite:
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
      extra = keep(extra, state.extra)
      skipped = skipped + (~ok).astype(jnp.int32)
    metrics = {
      **metrics,
      'grad_norm': grad_norm,
      'param_norm': optax.global_norm(params),
      'update_norm': optax.global_norm(updates),
      'lr': schedule(state.step),
      'skipped_steps': skipped,
    }
    return TrainState(state.step + 1, params, extra, opt_state, skipped), metrics

  return step


def _state_init(objective, tx):
  def init_state(key, start):
    params, extra = objective.init(key, start)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, params, extra, tx.init(params), zero)

  return init_state


def state_layout(objective, tx, mesh, rules, rng, start_params=None):
  """(abstract state, its shardings): shapes by eval_shape, shardings from ``rules``; nothing is
  allocated (``start_params`` may be arrays or ShapeDtypeStructs)."""
  abstract = jax.eval_shape(_state_init(objective, tx), rng, start_params)
  return abstract, sharding.infer_shardings(abstract, mesh, rules)


def create_state(objective, tx, mesh, rules, rng, start_params=None):
  """The train state, created directly sharded. Returns (state, shardings, abstract state)."""
  abstract, state_sharding = state_layout(objective, tx, mesh, rules, rng, start_params)
  init = jax.jit(_state_init(objective, tx), out_shardings=state_sharding)
  return init(rng, start_params), state_sharding, abstract


def jit_train_step(
  objective, tx, schedule, mesh, state_sharding, frozen_sharding, skip_nonfinite=False,
  augment=None,
):  # fmt: skip
  """The update, jitted with explicit shardings and the state's buffers donated."""
  repl = sharding.replicated(mesh)
  batch_sharding = device.batch_sharding(mesh, sharding.data_axes(mesh))
  return jax.jit(
    make_train_step(objective, tx, schedule, skip_nonfinite, augment),
    in_shardings=(state_sharding, frozen_sharding, batch_sharding, repl),
    out_shardings=(state_sharding, repl),
    donate_argnums=(0,),
  )


def make_optimizer(config, objective, total_steps: int, steps_per_epoch: int):
  """(optax transformation, lr schedule, peak lr) from config.optim."""
  if registry.entry(config.objective).own_optimizer:  # DINO / MOKD: own optimizers, schedules
    return objective.make_optimizer(config, total_steps, steps_per_epoch)
  o = config.optim
  peak = optim.learning_rate(o.base_lr, config.batch_size)
  warmup = o.warmup_steps or int(o.warmup_epochs * steps_per_epoch)
  schedule = optim.warmup_cosine(peak, warmup, total_steps, o.min_lr)
  lr_groups = objective.lr_groups
  if lr_groups and o.name != 'adamw':  # validate.py says so first; this guards direct callers
    raise ValueError(f"optim.name={o.name!r}: parameter groups on own schedules need 'adamw'")
  for regex, _, hold in lr_groups:
    if hold >= total_steps:
      logging.warning('parameters %s are held at lr 0 for all %d steps', regex, total_steps)
  if o.name == 'adamw':
    lr_scale = None
    if o.layer_decay < 1.0:
      depth = objective.model.depth
      lr_scale = lambda p: optim.layer_decay_scales(p, depth, o.layer_decay)  # noqa: E731
    groups = [  # (regex, lr multiplier, steps at lr 0 first): MOMA's projector warm-up
      (regex, optim.held_schedule(peak * scale, hold, warmup, total_steps, o.min_lr))
      for regex, scale, hold in lr_groups
    ]
    tx = optim.adamw(
      schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, frozen=objective.frozen_pattern,
      lr_scale=lr_scale, groups=groups,
    )  # fmt: skip
  elif o.name == 'lars':  # MAE / MoCo v3 linear probe; as MAE's LARS: no trust ratio on 1-D params
    matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    tx = optax.lars(
      schedule, weight_decay=o.weight_decay, momentum=0.9, weight_decay_mask=matrices,
      trust_ratio_mask=matrices,
    )  # fmt: skip
  elif o.name == 'sgd':  # the ViT transfer recipe
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay), optax.sgd(schedule, momentum=0.9))
  else:
    raise ValueError(f"optim.name={o.name!r}; one of 'adamw', 'lars', 'sgd'")
  if o.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx, schedule, peak


# --- evaluators ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Evaluation:
  """A configured evaluator: when it runs and what it yields for (state, frozen)."""

  name: str
  every_steps: int
  at_end: bool
  run: Callable[[TrainState, Any], Iterator[tuple[str, float]]]
  final_only: Callable[[TrainState, Any], Iterator[tuple[str, float]]] | None = None
  before: bool = False  # also run at step 0, as the "before training" baseline


def make_visualize(objective, mesh, count: int, augment=None) -> Callable[..., np.ndarray]:
  """(params, extra, frozen, batch) -> float32 [count, H, W', 3] in [0, 1] on every process: the
  objective's ``visualize`` panels of the batch's first ``count`` examples side by side (an
  objective without one: its views of the training image size), for TensorBoard. ``augment``:
  the train step's on-device augmentation, so the panels show what the model is trained on."""
  views = sorted(objective.required_views())

  def panels(params, extra, frozen, batch):
    if augment is not None:
      batch = augment(batch)
    batch = {k: batch[k][:count] for k in views}
    out = objective.visualize(params, extra, frozen, batch, jax.random.key(0))
    if out is None:
      shape = batch[views[0]].shape
      out = {k: images.to_unit(v) for k, v in batch.items() if v.shape == shape}
    return images.side_by_side(out)

  fn = jax.jit(panels, out_shardings=NamedSharding(mesh, PartitionSpec()))
  return lambda *args: np.asarray(jax.device_get(fn(*args)))


def make_evaluations(config, objective, mesh, data_axes) -> list[Evaluation]:
  evals = []
  common = dict(
    image_size=config.data.image_size, mesh=mesh, data_axes=data_axes,
    data_dir=config.data.data_dir, resize_ratio=config.data.eval_resize_ratio,
  )  # fmt: skip
  for name, ec in config.evaluators.items():
    if not (ec.every_steps or ec.at_end):
      continue
    if name == 'knn':
      ev = KnnEvaluator(
        dataset=config.data.name,
        train_split=validate.evaluator_split(config, ec, 'train_split'),
        eval_split=validate.evaluator_split(config, ec, 'eval_split'),
        batch_size=ec.batch_size, max_train_examples=ec.max_train or None,
        linear=ec.get('linear', True), spread=ec.get('spread', False), **common,
      )  # fmt: skip

      pool = ec.get('features', 'cls')

      # Built once, so every periodic evaluation hits jit's cache instead of recompiling.
      def features(a, x, pool=pool):
        return objective.features(*a, x, pool=pool)

      def run(state, frozen, ev=ev, features=features):
        return ev.run(features, (state.params, state.extra, frozen), 'knn/model')

      def final(state, frozen, ev=ev, ec=ec, pool=pool, features=features):
        if ec.get('teachers'):
          for t_name, t in objective.eval_teachers().items():
            n = t.input_norm
            fn = encoder_features(t.model, pool=pool, mean=n.mean, std=n.std)
            yield from ev.run(fn, frozen[t_name], f'knn/teacher_{t_name}')
        for tag, fn in objective.extra_features().items():  # MOKD's CNN
          run_fn = lambda a, x, fn=fn: fn(*a, x)  # noqa: E731
          yield from ev.run(run_fn, (state.params, state.extra, frozen), f'knn/{tag}')
        if ec.get('random_init'):  # the same architecture, randomly initialised: the floor
          params, extra = objective.init(jax.random.key(config.seed + 1))
          params, extra = jax.device_put((params, extra), NamedSharding(mesh, PartitionSpec()))
          yield from ev.run(features, (params, extra, frozen), 'knn/random_init')
        if ec.get('raw_pixels'):
          yield from ev.run(pixel_features(), None, 'knn/raw_pixels')

      before = bool(ec.get('before')) and ec.at_end
      evals.append(Evaluation('knn', ec.every_steps, ec.at_end, run, final, before))
    elif name == 'classification':
      ev = ClassificationEvaluator(
        dataset=config.data.name,
        split=validate.evaluator_split(config, ec, 'split'),
        batch_size=ec.batch_size,
        **common,
      )

      def predict(a, x):
        return objective.predict(*a, x)

      def run(state, frozen, ev=ev, predict=predict):
        return ev.run(predict, (state.params, state.extra, frozen), 'eval')

      evals.append(Evaluation('classification', ec.every_steps, ec.at_end, run))
    else:
      raise ValueError(f"unknown evaluator {name!r}; known: 'knn', 'classification'")
  return evals


# --- helpers ---------------------------------------------------------------------------------------


def prepare_state(
  objective, mesh, state: TrainState, state_sharding, frozen, batches, rng, augment=None
):
  """A fresh run's ``objective.prepare`` on the stream's first ``prepare_batches`` batches (after
  the on-device ``augment``, as the step sees them), which are then put back in front of the
  stream (the run trains on them as usual). Returns (state, batches)."""
  first = list(itertools.islice(batches, objective.prepare_batches))
  if not first:  # the stream ended (a preemption notice while reading data): the loop handles it
    return state, batches

  def run(params, extra, frozen, views, key):
    views = tuple(augment(b) for b in views) if augment is not None else views
    return objective.prepare(params, extra, frozen, views, key)

  prepare = jax.jit(run, out_shardings=(state_sharding.params, sharding.replicated(mesh)))
  # a key of its own (the init key folded), so the steps' keys are those of a run without it
  params, info = prepare(
    state.params, state.extra, frozen, tuple(b for b, _ in first), jax.random.fold_in(rng, 1)
  )
  info = {k: float(v) for k, v in jax.device_get(info).items()}
  logging.info('prepared on %d batches: %s', len(first), _format(info))
  return state.replace(params=params), itertools.chain(first, batches)


def _check_finite(step: int, metrics: dict[str, Any]) -> None:
  for name in ('loss', 'grad_norm', 'param_norm'):
    value = float(metrics[name])
    if not np.isfinite(value):
      raise NonFiniteError(
        f'non-finite {name} ({value}) at step {step}; no checkpoint was written for it. '
        'Lower the learning rate, enable optim.grad_clip, or check the input data'
      )


def export_model(
  components: dict[str, tuple[Any, Any, int | None]],
  workdir: storage.PathLike,
  metadata: dict[str, Any],
  torch_format: str | None = None,
  input_norm: pretrained.Normalization = pretrained.IMAGENET,
) -> storage.Path:
  """Writes workdir/export/model (a converted-checkpoint directory: 'encoder' plus heads such as
  'decoder' or MoCo's 'projector') and model.pth (PyTorch; MAE/timm naming, or MoCo v3's
  .pth.tar layout when ``torch_format='mocov3'``).

  components: name -> (module, variables {'params': ...[, 'batch_stats': ...]}, input width).
  """
  from convert.convert import export_checkpoint

  out = storage.Path(workdir) / 'export' / 'model'
  specs = {k: pretrained.spec_of(m, d) for k, (m, _, d) in components.items()}
  host = {k: sharding.to_host(v) for k, (_, v, _) in components.items()}
  if jax.process_index() == 0:
    enc = components['encoder'][0]
    if isinstance(enc, vit.ViT):
      arch = {
        'image_size': enc.image_size,
        'patch_size': enc.patch_size,
        'variant': vit.name_variant(enc.width, enc.depth, enc.num_heads, enc.patch_size),
      }
    else:  # a ResNet (DINO, MOKD)
      arch = {'variant': resnet.name_variant(enc.block, enc.stage_sizes, enc.width, enc.small_stem)}
    meta = {**metadata, 'format': 'moma_jax', **input_norm.to_metadata(), **arch}
    pretrained.save_pretrained(out, specs, host, meta, overwrite=True)
    export_checkpoint(
      out, storage.Path(workdir) / 'export' / 'model.pth', overwrite=True, fmt=torch_format
    )
  return out


# Config keys that may change between a run and its resumption (run length, logging, paths).
RESUMABLE_CHANGES = (
  'stop_at_step', 'num_train_steps', 'num_epochs', 'log_every', 'checkpoint_every',
  'keep_checkpoints', 'evaluators', 'force_resume', 'data.data_dir', 'data.manual_dir',
  'tensorboard',
)  # fmt: skip


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, str]:
  return {
    k: json.dumps(v, default=str, sort_keys=True)
    for k, v in validate.flatten_config(config).items()
    if not k.startswith(RESUMABLE_CHANGES)
  }


def check_same_experiment(config, stored: dict[str, str] | None, workdir: str) -> None:
  """Refuses to resume a workdir whose checkpoints come from a different experiment."""
  if stored is None or config.force_resume:
    return
  current = _flat_config(config)
  diff = sorted(k for k in set(current) | set(stored) if current.get(k) != stored.get(k))
  if diff:
    shown = ', '.join(f'{k}: {stored.get(k)} -> {current.get(k)}' for k in diff[:4])
    raise ValueError(
      f'{workdir} holds checkpoints of a different experiment ({len(diff)} setting(s) differ: '
      f'{shown}); use a new --workdir, or pass --config.force_resume=True to resume anyway'
    )


class Preemption:
  """SIGTERM (the preemption notice of Cloud TPU and most clusters) -> save and exit cleanly.

  Single process: our own handler sets a flag. Multi-process: orbax / JAX's preemption sync point,
  so every host stops at the same step.
  """

  def __init__(self):
    import signal
    import threading

    self.notice = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.notice = True

  def reached(self, step: int, ckpt: checkpointing.Checkpointer) -> bool:
    if jax.process_count() > 1:
      return ckpt.reached_preemption(step)
    return self.notice

  def close(self):
    import signal

    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def host_batches(
  train_iter: Iterator[dict[str, np.ndarray]], preemption: Preemption
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
  """(host batch, stream position after it), read by a background thread.

  Python runs signal handlers only in the main thread, between bytecodes: a main thread blocked
  inside tf.data's C++ (a slow or stalled read) would never see a SIGTERM. Here the main thread
  waits on a queue in short slices instead, and the stream ends early on a preemption notice.
  Errors of the stream (a DataError) are raised in the main thread.
  """
  q: queue.Queue = queue.Queue(maxsize=2)
  done = threading.Event()

  def produce():
    try:
      for batch in train_iter:
        item = (batch, train_iter.next_index)
        while not done.is_set():
          try:
            q.put(item, timeout=0.2)
            break
          except queue.Full:
            pass
        if done.is_set():
          return
    except BaseException as e:  # noqa: BLE001  (handed to the main thread)
      q.put(e)

  threading.Thread(target=produce, name='host-batches', daemon=True).start()
  try:
    while True:
      try:
        item = q.get(timeout=0.2)
      except queue.Empty:
        if preemption.notice:
          return
        continue
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    done.set()


# --- set-up shared by a run and a plan ------------------------------------------------------------


@dataclasses.dataclass
class Setup:
  """Everything a run and a plan (moma_jax/plan.py) build the same way before any state exists,
  so that what a plan compiles is what a run executes."""

  mesh: Mesh
  data_axes: tuple[str, ...]
  per_host_batch: int
  views: dict[str, Any]  # the ViewSpecs the objective reads
  augment: Callable[[dict], dict] | None  # photometric augmentation inside the step, or None
  objective: Any
  frozen: Any  # frozen variables: arrays (a run) or ShapeDtypeStructs (a plan)
  start_params: Any
  notes: list[str]
  tx: optax.GradientTransformation
  schedule: Callable[[Any], Any]
  peak_lr: float
  total_steps: int
  steps_per_epoch: int

  def frozen_sharding(self, config) -> Any:
    return sharding.infer_shardings(self.frozen, self.mesh, config.frozen_sharding_rules)

  def batch_sharding(self) -> NamedSharding:
    return device.batch_sharding(self.mesh, self.data_axes)

  def train_step(self, config, state_sharding):
    """The jitted update for this set-up (not yet compiled)."""
    return jit_train_step(
      self.objective, self.tx, self.schedule, self.mesh, state_sharding,
      self.frozen_sharding(config), config.skip_nonfinite, self.augment,
    )  # fmt: skip


def build_setup(
  config: ml_collections.ConfigDict,
  devices: list[Any],
  split_size: Callable[[], tuple[int, int]],
  loader: builders.Loader = builders.ARRAYS,
) -> Setup:
  """Mesh over ``devices``, batch split, views, objective, optimizer: cheap checks first, then
  ``split_size()`` -> (train examples, classes) (a run opens its dataset there), before any
  compilation; one-line ValueErrors. ``loader``: arrays for a run, shapes for a plan."""
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  data_axes = sharding.data_axes(mesh)
  per_host_batch = device.check_batch_size(config.batch_size, mesh, data_axes)
  views = pipeline.views_from_config(config.data.views)
  platform = mesh.devices.flat[0].platform
  on_device = photometric.on_device(config.data.get('photometric', 'auto'), platform)
  train_examples, num_classes = split_size()
  _check_split(config, train_examples, num_classes)
  steps_per_epoch = max(1, train_examples // config.batch_size)
  total_steps = config.num_train_steps or int(config.num_epochs * steps_per_epoch)
  objective, frozen, start_params, notes = registry.build_objective(
    config, num_classes, total_steps, steps_per_epoch, loader, platform
  )
  missing_views = objective.required_views() - set(views)
  if missing_views:
    raise ValueError(f'data.views lacks {sorted(missing_views)}, which the objective reads')
  for name in objective.required_views():
    if (
      views[name].size != config.data.image_size and not registry.entry(config.objective).multi_crop
    ):
      raise ValueError(f'view {name!r} must be data.image_size={config.data.image_size}px')
  tx, schedule, peak_lr = make_optimizer(config, objective, total_steps, steps_per_epoch)
  used = {k: views[k] for k in objective.required_views()}
  augment = (
    photometric.make_batch_fn(used, photometric.compute_dtype(platform)) if on_device else None
  )
  return Setup(
    mesh, data_axes, per_host_batch, used, augment, objective, frozen, start_params, notes, tx,
    schedule, float(peak_lr), total_steps, steps_per_epoch,
  )  # fmt: skip


def _check_split(config, train_examples: int, num_classes: int) -> None:
  """What would run to exit 0 and print nonsense: a batch the training split cannot fill (every
  batch would repeat its images), labels the probes cannot separate (top-1 100% by construction)."""
  where = f'{config.data.name} (split {config.data.train_split!r})'
  if validate.reads_labels(config) and num_classes < 2:
    raise ValueError(
      f'{where} has {num_classes} class: the k-NN / linear-probe / classification scores would be '
      '100% by construction; give a folder with one sub-folder per class, or turn the evaluators '
      'off (--config.evaluators.knn.at_end=False, for a self-supervised run on unlabelled images)'
    )
  if config.batch_size > train_examples:
    raise ValueError(
      f'batch_size={config.batch_size} is larger than the {train_examples} training examples of '
      f'{where}; give --config.batch_size={_largest_pow2(train_examples)} or more data'
    )


def _largest_pow2(n: int) -> int:
  return 1 << (max(n, 1).bit_length() - 1)


# --- the loop --------------------------------------------------------------------------------------


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: storage.PathLike,
  dry_run: bool = False,
  devices: Sequence[jax.Device] | None = None,
) -> dict[str, float]:
  """Runs (or resumes) the configured training in ``workdir`` (a local path or gs://...);
  returns the final metrics. ``dry_run``: stop after step 1 below (dataset opened, checkpoints
  loaded, model, optimizer and evaluators built), having written nothing; returns the plan.
  ``devices``: the devices the mesh spans (default: all of them, every process's)."""
  workdir = storage.resolve(workdir)
  # 1. Everything cheap and checkable first.
  if storage.is_remote(workdir):
    try:  # an unreachable bucket fails here, in one line, not after converting teachers
      workdir.exists()
    except Exception as e:  # noqa: BLE001  (tf.errors / gcsfs errors are not OSErrors)
      raise OSError(
        f'cannot reach --workdir {workdir} ({" ".join(str(e).split())[:300]}); check the bucket '
        'name, network access and credentials (gcloud auth application-default login)'
      ) from e
  opened, unprepared = [], []
  d = config.data

  def open_train_split() -> tuple[int, int]:
    try:  # a dry run prepares nothing: preparing ImageNet takes hours and writes to data_dir
      src = sources.open_split(
        d.name, d.train_split, data_dir=d.data_dir, manual_dir=None if dry_run else d.manual_dir
      )
    except sources.NotPrepared:
      if not (dry_run and d.manual_dir and (d.name, d.train_split) in sources.KNOWN_SPLITS):
        raise
      unprepared.append(
        f'{d.name} is not prepared in data_dir={d.data_dir}: the run will first prepare it from '
        f'data.manual_dir={d.manual_dir} (hours for ImageNet); the sizes here are the tfds '
        "catalogue's, and the evaluators are built after the preparation"
      )
      return sources.KNOWN_SPLITS[(d.name, d.train_split)]
    src.random_access()  # a TFRecord-only copy: say how to convert it now, not after compiling
    opened.append(src)
    return src.total_examples, src.num_classes

  setup = build_setup(config, jax.devices() if devices is None else devices, open_train_split)
  mesh, data_axes, objective, notes = setup.mesh, setup.data_axes, setup.objective, setup.notes
  total_steps, steps_per_epoch = setup.total_steps, setup.steps_per_epoch
  evaluations = [] if unprepared else make_evaluations(config, objective, mesh, data_axes)
  if dry_run:
    plan = {
      'mesh': dict(mesh.shape), 'batch_size': config.batch_size, 'num_train_steps': total_steps,
      'steps_per_epoch': steps_per_epoch, 'peak_lr': setup.peak_lr,
      'dataset': f'{d.name}/{d.train_split}',
      'train_examples': (
        opened[0].total_examples if opened
        else f'{sources.KNOWN_SPLITS[(d.name, d.train_split)][0]:,} (catalogue)'
      ),
      'gflops_per_step': objective.flops_per_example() * config.batch_size / 1e9,
    }  # fmt: skip
    for note in notes:
      logging.info('%s', note)
    return {'summary': [f'{config.name}: dry run, nothing written; ' + _format(plan), *unprepared]}
  with jax.set_mesh(mesh):  # the mesh in context while tracing (Pallas kernels shard_map over it)
    return _train(config, workdir, setup, opened[0], evaluations)


def _train(config, workdir, setup: Setup, train_src, evaluations: list[Evaluation]) -> dict:
  """Stages 2-5 of train_and_evaluate: state, resume, the loop, final save / export / evals."""
  mesh, objective, notes = setup.mesh, setup.objective, setup.notes
  total_steps, steps_per_epoch = setup.total_steps, setup.steps_per_epoch
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt = checkpointing.Checkpointer(workdir / 'checkpoints', keep=config.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:  # before anything is written: a refused resume leaves the workdir as is
    check_same_experiment(config, ckpt.read_extra(latest).get('config'), workdir)
  # TensorBoard event files are written by TensorFlow's own file system layer (gs:// included).
  writer = metric_writers.create_default_writer(
    workdir if config.tensorboard else None,
    just_logging=jax.process_index() > 0 or not config.tensorboard,
  )
  for note in notes:
    (logging.warning if 'RANDOM' in note else logging.info)('%s', note)
  if jax.process_index() == 0:
    storage.write_text_atomic(workdir / 'config.json', config.to_json_best_effort(indent=2))
  logging.info(
    '%s: mesh %s, global batch %d (%d per host), %d steps (%d per epoch), peak lr %.3g',
    config.name, dict(mesh.shape), config.batch_size, setup.per_host_batch, total_steps,
    steps_per_epoch, setup.peak_lr,
  )  # fmt: skip

  # 2. State, created sharded.
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  state, state_sharding, abstract = create_state(
    objective, setup.tx, mesh, config.sharding_rules, init_rng, setup.start_params
  )
  setup.start_params = None  # the host copy of a checkpoint is no longer needed
  frozen = setup.frozen = jax.device_put(setup.frozen, setup.frozen_sharding(config))

  # 3. Resume.
  start_index = 0
  if latest is not None:
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
    )
    state, extra = ckpt.restore(latest, target)
    start_index = int(extra['data_index'][jax.process_index()])
    history, baseline = list(extra.get('history', [])), dict(extra.get('baseline', {}))
    logging.info('resumed from step %d (data position %d)', latest, start_index)
  else:
    history, baseline = [], {}
    for ev in evaluations:  # the model before training, for the final summary
      if ev.before:
        results = {
          k.replace('knn/model/', f'{summary.BEFORE}/'): v for k, v in ev.run(state, frozen)
        }
        logging.info('before training: %s', _format(results))
        baseline.update(results)
  step = int(state.step)

  # 4. The loop.
  augment = setup.augment
  train_iter = pipeline.train_iterator(
    train_src, setup.views, batch_size=setup.per_host_batch, seed=config.seed,
    start_index=start_index, process_index=jax.process_index(),
    device_photometric=augment is not None,
  )  # fmt: skip

  train_step = setup.train_step(config, state_sharding)
  check = (lambda *_: None) if config.skip_nonfinite else _check_finite
  flops_per_step = objective.flops_per_example() * config.batch_size
  peak = hardware.peak_flops(mesh.devices.flat[0].device_kind)
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)

  data_index = start_index
  visualize = None  # every process computes the images (a sharded computation); process 0 writes
  if config.image_every and config.tensorboard:
    visualize = make_visualize(objective, mesh, config.image_count, augment)
  shown = None  # the first batch: the examples every image summary shows

  def save(at_step: int):
    positions = multihost_utils.process_allgather(np.int64(data_index))
    facts = {
      'data_index': [int(i) for i in np.ravel(positions)],
      'config': _flat_config(config),
      'history': history,  # the metrics so far, so a resumed run reports its whole history
      'baseline': baseline,
    }
    ckpt.save(at_step, state, facts)

  prev_metrics = None
  collapsed = False  # the collapse warning is given once
  t_log, steps_since_log = time.perf_counter(), 0
  t_start, first_step = t_log, step
  stop = min(total_steps, config.stop_at_step or total_steps)
  preemption = Preemption()
  host = host_batches(train_iter, preemption)
  batches = device.prefetch_to_device(host, setup.batch_sharding(), size=1)
  if latest is None and objective.prepare_batches:
    state, batches = prepare_state(
      objective, mesh, state, state_sharding, frozen, batches, init_rng, augment
    )
  preempted = False
  try:
    while step < stop:
      item = next(batches, None)
      if item is None:  # the stream ends only on a preemption notice while waiting for data
        preempted = True
        logging.warning('preemption notice while reading data: saving step %d and exiting', step)
        break
      batch, next_index = item
      if visualize is not None and shown is None:
        shown = jax.tree.map(lambda x: x[: config.image_count], batch)
      state, metrics = train_step(state, frozen, batch, train_rng)
      if prev_metrics is not None:  # checked one step late, so the host never stalls the device
        check(step - 1, prev_metrics)
      prev_metrics = metrics
      step += 1
      data_index = next_index
      steps_since_log += 1
      report(step)
      if step % config.log_every == 0 or step == total_steps:
        m = jax.device_get(metrics)
        check(step, m)
        dt = time.perf_counter() - t_log
        scalars = {k: float(v) for k, v in m.items()}
        scalars['images_per_sec'] = steps_since_log * config.batch_size / dt
        if peak:
          scalars['mfu'] = flops_per_step * steps_since_log / dt / (peak * mesh.size)
        writer.write_scalars(step, scalars)
        history.append({'step': step, **scalars})
        t_log, steps_since_log = time.perf_counter(), 0
        eta = (total_steps - step) * (t_log - t_start) / max(step - first_step, 1)
        progress = ''.join(f'  {label} {scalars[k]:.2f}' for label, k in objective.progress_metrics)
        logging.info(
          'step %d/%d  loss %.4g  %.0f img/s  ETA %s%s', step, total_steps, scalars['loss'],
          scalars['images_per_sec'], _duration(eta), progress,
        )  # fmt: skip
        warning = None if collapsed else objective.collapse(scalars)
        if warning:
          collapsed = True
          logging.warning('step %d: %s', step, warning)
      if visualize is not None and (step % config.image_every == 0 or step == total_steps):
        writer.write_images(step, {'images': visualize(state.params, state.extra, frozen, shown)})
      for ev in evaluations:
        if ev.every_steps and step % ev.every_steps == 0 and step < total_steps:
          writer.write_scalars(step, dict(ev.run(state, frozen)))
      if preemption.reached(step, ckpt):
        preempted = True
        logging.warning('preemption notice: saving a checkpoint at step %d and exiting', step)
        break
      if step % config.checkpoint_every == 0 and step < stop:
        check(step, jax.device_get(metrics))
        save(step)
  finally:
    host.close()
    preemption.close()

  # 5. Final save, export, evaluation.
  if prev_metrics is not None:
    check(step, jax.device_get(prev_metrics))
  if latest != step:
    save(step)
  ckpt.wait()
  if step < total_steps:  # preempted or stop_at_step: leave a checkpoint to resume from
    ckpt.close()
    return {'step': step, 'preempted': preempted}
  exported = objective.export(state.params, state.extra)
  if exported:
    export_model(
      exported, workdir, {'config': config.name, 'steps': step},
      objective.torch_format, objective.input_norm,
    )  # fmt: skip
    logging.info('exported the trained model to %s/export', workdir)
  final = {'step': step, **(history[-1] if history else {}), **baseline}
  for ev in evaluations:
    if ev.at_end:  # the last minute of a runlocal run: say so, one line per evaluator
      t_eval = time.perf_counter()
      also = ' and its baselines' if ev.final_only else ''
      logging.info('final evaluation (%s) of the trained model%s...', ev.name, also)
      results = dict(ev.run(state, frozen))
      if ev.final_only:
        results.update(ev.final_only(state, frozen))
      writer.write_scalars(step, results)
      final.update(results)
      logging.info('final evaluation (%s): %.0f s', ev.name, time.perf_counter() - t_eval)
  writer.flush()
  ckpt.close()
  final['summary'] = summary.final_block(
    name=config.name, objective=config.objective, step=step, total_steps=total_steps,
    seconds=time.perf_counter() - t_start, dataset=f'{config.data.name}/{_eval_split(config)}',
    num_classes=train_src.num_classes, final=final, first_step=first_step,
    workdir=str(workdir), exported=bool(exported),
  )  # fmt: skip
  if jax.process_index() == 0:
    storage.write_text_atomic(
      workdir / 'final_metrics.json', json.dumps({'final': final, 'history': history}, indent=1)
    )
  return final


def _eval_split(config) -> str:
  ev = config.evaluators
  if 'knn' in ev and ev.knn.at_end:
    return validate.evaluator_split(config, ev.knn, 'eval_split')
  if 'classification' in ev:
    return validate.evaluator_split(config, ev.classification, 'split')
  return config.data.eval_split


def _format(results: dict[str, Any]) -> str:
  return ', '.join(
    f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in results.items()
  )


def _duration(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  return f'{m // 60}h{m % 60:02d}m' if m >= 60 else f'{m}m{s:02d}s'
