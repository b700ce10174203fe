"""Objectives of the one trainer: :class:`Objective` is everything the trainer calls on one, and
objectives/registry.py maps each config's ``objective`` name to its builder and checks.

``frozen`` holds what is used but never trained (teachers, a probed encoder): a jit argument,
sharded once, never in the optimizer state or in checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # JAX-free at run time: validate.py reads the registry before JAX starts
  import jax


class Objective:
  """The contract between an objective and the trainer (train.py, plan.py, the evaluators).

  Each objective is a frozen dataclass deriving from this class, with pure functions. The members
  that raise NotImplementedError below are required; the others have the defaults here. (Only
  methods and plain class attributes live here: a dataclass would take a base-class attribute
  of a field's name as that field's default.)
  """

  # --- required -----------------------------------------------------------------------------------
  # input_norm: the model's input statistics (models.pretrained.Normalization), a dataclass field

  def init(self, rng: jax.Array, pretrained: Any = None) -> tuple[Any, Any]:
    """(trainable params, extra): extra is state that is not trained by the optimizer (BatchNorm
    statistics, EMA weights, DINO's centre)."""
    raise NotImplementedError

  def loss(self, params, extra, frozen, batch: dict[str, jax.Array], rng: jax.Array):
    """(loss, (metrics, new extra)) of one batch of views (uint8 images)."""
    raise NotImplementedError

  def features(self, params, extra, frozen, images: jax.Array, pool: str = 'cls') -> jax.Array:
    """[B, D] features of uint8 images, for the k-NN and the linear probe."""
    raise NotImplementedError

  def required_views(self) -> set[str]:
    """The data views (config.data.views names) the loss reads."""
    raise NotImplementedError

  def flops_per_example(self) -> float:
    """Model FLOPs of one training example (forward and backward), for MFU and the plan."""
    raise NotImplementedError

  def export(self, params, extra) -> dict[str, tuple[Any, Any, Any]]:
    """{component: (module, variables, input dim or None)} written as workdir/export/model
    ('encoder' plus heads); {} exports nothing."""
    raise NotImplementedError

  # --- optional, with defaults ------------------------------------------------------------------------
  # The PyTorch layout of the export (convert/formats.py: 'mae', 'mocov3', 'dino'); None: none.
  torch_format: str | None = None
  # Regex of parameter paths the optimizer must not update (fixed sin-cos tables).
  frozen_pattern: str | None = None
  # ((regex, lr multiplier, steps held at lr 0), ...): parameter groups on schedules of their own
  # (AdamW; MOMA's projector warm-up).
  lr_groups: tuple[tuple[str, float, int], ...] = ()
  # ((label, metric name), ...) shown on every step line of the log (DINO / MOKD: the teachers'
  # collapse signals).
  progress_metrics: tuple[tuple[str, str], ...] = ()
  # How many batches of the training stream ``prepare`` reads before the first step of a fresh
  # run (0: no prepare stage). The trainer trains on those batches as usual afterwards.
  prepare_batches: int = 0

  def prepare(self, params, extra, frozen, batches: tuple[dict[str, jax.Array], ...], rng):
    """(params, {name: scalar}) set from the first ``prepare_batches`` batches before the first
    step of a fresh run, never on a resume (MOMA's closed-form projector fit); the scalars are
    logged."""
    return params, {}

  def eval_teachers(self) -> dict[str, Any]:
    """{name: teacher} of frozen teachers (``.model`` a ViT, ``.input_norm`` its statistics;
    ``frozen[name]`` their variables) that the final k-NN reports beside the model."""
    return {}

  def extra_features(self) -> dict[str, Any]:
    """{tag: (params, extra, frozen, images) -> features} of further models the final k-NN
    reports as knn/<tag> (MOKD's CNN)."""
    return {}

  def collapse(self, metrics: dict[str, Any]) -> str | None:
    """A one-line warning when the logged ``metrics`` (host floats) show a collapsed model
    (DINO / MOKD teachers), else None; the trainer logs it with the step, once."""
    return None

  def visualize(self, params, extra, frozen, batch, rng) -> dict[str, jax.Array] | None:
    """Image panels for TensorBoard ({name: [B, H, W, 3] in [0, 1]}); None: the views as they
    are trained on."""
    return None

  def predict(self, params, extra, frozen, images: jax.Array) -> jax.Array:
    """[B, classes] logits (objectives that train a classifier: the classification evaluator)."""
    raise NotImplementedError(f'{type(self).__name__} has no classifier to evaluate')

  def make_optimizer(self, config, total_steps: int, steps_per_epoch: int):
    """(optax transformation, lr schedule, peak lr) of objectives whose registry entry says
    own_optimizer (DINO's weight-decay schedule, MOKD's two models)."""
    raise NotImplementedError(f"{type(self).__name__} uses the trainer's optimizer")
