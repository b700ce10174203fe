"""MOKD: multi-mode online knowledge distillation (arXiv 2304.06461; official code
github skyoux/mokd, main_mokd.py + models/mokd.py): a CNN and a ViT trained together.

Each model does DINO against its own EMA teacher (objectives/dino.py), and the two distil into
each other:
  * self-distillation: DINO(student head, teacher head) and DINO(student search head, teacher
    search head), the search head (``TransHead``) run without a query on every crop;
  * cross-distillation: DINO(CNN student head, ViT teacher head) (and the reverse), and the
    "cross-attention feature search": the ViT teacher's search head reads the patch tokens of
    global view 1 with the CNN student's (detached, pooled, reduced) local-crop feature prepended
    as a query, and the CNN student's local-crop search output is pulled to it by cross-entropy
    without centering (and the reverse, with the ViT student's local-crop CLS as the query);
  * L_cnn = DINO_self + DINO_search + lambda_c (DINO_cross + CE_search); L_vit likewise with
    lambda_t. Every DINO term has its own center; the CNN's two self terms warm their teacher
    temperature over ``warmup_teacher_temp_epochs_cnn`` epochs, all other terms over the ViT's.

The two losses touch disjoint parameters (every cross term reads the other model's teachers or
detached features), so one gradient of L_cnn + L_vit gives each model its own gradient.

Per-model optimizers (``make_optimizer``): optax ``multi_transform`` over the two parameter trees,
each with its own schedules, as the official code's two optimizers: the CNN by SGD (momentum 0.9,
lr 0.1 x batch / 256 -> 0.0048, weight decay 1e-4), the ViT by AdamW (lr 3e-4 x batch / 256 ->
1e-5, weight decay 0.04 -> 0.4), 10 warm-up epochs, per-tensor clipping 3.0, ``last_layer``s frozen
in epoch 1. Official-code quirk kept by default (``cnn_search_schedule='vit'``): the CNN's search
head is stepped by the CNN's SGD but with the ViT's lr and weight-decay schedules, weight decay on
all its parameters; 'cnn' gives it the CNN's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from moma_jax import ema
from moma_jax.models import resnet
from moma_jax.models.heads import DinoHead, TransHead
from moma_jax.models.pretrained import IMAGENET, Normalization
from moma_jax.models.vit import ViT
from moma_jax.objectives import Objective, dino

Array = jax.Array

CENTERS = ('cnn', 'cnn_search', 'cnn_cross', 'vit', 'vit_search', 'vit_cross')


def search_loss(student: Array, teacher: Array, teacher_temp: Array, student_temp: float) -> Array:
  """MOKD's CTSearchLoss: CE(softmax(teacher / T_t), log_softmax(student / T_s)), no centering."""
  t = jax.nn.softmax(jax.lax.stop_gradient(teacher.astype(jnp.float32)) / teacher_temp, axis=-1)
  logp = jax.nn.log_softmax(student.astype(jnp.float32) / student_temp, axis=-1)
  return jnp.mean(jnp.sum(-t * logp, axis=-1))


def mokd_losses(
  s_cnn: dict[str, Array],
  s_vit: dict[str, Array],
  t_cnn: dict[str, Array],
  t_vit: dict[str, Array],
  centers: dict[str, Array],
  temp_cnn: Array,
  temp_vit: Array,
  *,
  n_crops: int,
  lambda_c: float,
  lambda_t: float,
  student_temp: float = 0.1,
  center_momentum: float = 0.9,
  centering: str = 'center',
) -> tuple[Array, Array, dict[str, Array], dict[str, Array]]:
  """The MOKD losses from the models' outputs: (L_cnn, L_vit, new centers, metrics).

  Students (all crops, global first, stacked view-major): 'head' [n_crops B, K] and 'search'
  [n_crops B, K] (the search head without a query). Teachers (global crops): 'head' [2B, K],
  'search' [2B, K], and 'query_search' [n_local B, K] (the search head on global view 1 with the
  *other* student's local-crop feature as query). ``centering`` (dino.CENTERINGS) makes the six
  DINO terms' teacher targets; the two query-search terms have none, as in MOKD.
  """
  split = lambda x, n: jnp.split(x, n)  # noqa: E731
  new, m = {}, {}
  dl = lambda s, t, c, temp: dino.dino_loss(  # noqa: E731
    split(s, n_crops), split(t, 2), centers[c], temp, student_temp, center_momentum, centering
  )
  n_local = n_crops - 2
  b = t_cnn['head'].shape[0] // 2
  terms = {}
  terms['cnn'], new['cnn'] = dl(s_cnn['head'], t_cnn['head'], 'cnn', temp_cnn)
  terms['cnn_search'], new['cnn_search'] = dl(
    s_cnn['search'], t_cnn['search'], 'cnn_search', temp_cnn
  )
  terms['cnn_cross'], new['cnn_cross'] = dl(s_cnn['head'], t_vit['head'], 'cnn_cross', temp_vit)
  terms['vit'], new['vit'] = dl(s_vit['head'], t_vit['head'], 'vit', temp_vit)
  terms['vit_search'], new['vit_search'] = dl(
    s_vit['search'], t_vit['search'], 'vit_search', temp_vit
  )
  terms['vit_cross'], new['vit_cross'] = dl(s_vit['head'], t_cnn['head'], 'vit_cross', temp_vit)
  if n_local:
    terms['cnn_query'] = search_loss(
      s_cnn['search'][2 * b :], t_vit['query_search'], temp_vit, student_temp
    )
    terms['vit_query'] = search_loss(
      s_vit['search'][2 * b :], t_cnn['query_search'], temp_vit, student_temp
    )
  else:
    terms['cnn_query'] = terms['vit_query'] = jnp.float32(0.0)
  l_cnn = terms['cnn'] + terms['cnn_search'] + lambda_c * (terms['cnn_cross'] + terms['cnn_query'])
  l_vit = terms['vit'] + terms['vit_search'] + lambda_t * (terms['vit_cross'] + terms['vit_query'])
  m = {f'loss/{k}': v for k, v in terms.items()}
  for name, t, temp in (('cnn', t_cnn, temp_cnn), ('vit', t_vit, temp_vit)):  # each DINO teacher
    for k, v in dino.collapse_metrics(t['head'], centers[name], temp, centering).items():
      m[f'{k}/{name}'] = v
  return l_cnn, l_vit, new, m


@dataclasses.dataclass(frozen=True)
class Mokd(Objective):
  """MOKD with a ResNet (``cnn``) and a ViT (``vit``).

  params: {'cnn': {'backbone', 'head', 'search'}, 'vit': {...}}; extra: {'teacher': the same
  trees (EMA), 'cnn_bn' / 'teacher_cnn_bn' (BatchNorm statistics), 'center': one per DINO term,
  'step'}. k-NN features: the ViT teacher's CLS (``features``) and the CNN teacher's pooled
  features (``extra_features``), as the official evaluation of ``teacher_vit`` / ``teacher_cnn``.
  """

  cnn: resnet.ResNet
  vit: ViT
  cnn_head: DinoHead
  vit_head: DinoHead
  cnn_search: TransHead
  vit_search: TransHead
  total_steps: int
  steps_per_epoch: int
  num_local: int = 8
  student_temp: float = 0.1
  teacher_temp: float = 0.07
  warmup_teacher_temp: float = 0.04
  warmup_teacher_temp_epochs_cnn: int = 50
  warmup_teacher_temp_epochs_vit: int = 30
  center_momentum: float = 0.9
  centering: str = 'center'  # or 'sinkhorn' (DINOv2's teacher targets, every DINO term)
  base_momentum: float = 0.996
  lambda_c: float = 1.0
  lambda_t: float = 0.1
  cnn_norm_last_layer: bool = True  # official code: hard-wired True (the CLI flag is ignored)
  vit_norm_last_layer: bool = False  # official code: hard-wired False
  cnn_search_schedule: str = 'vit'  # official code: the ViT's lr / wd schedules; or 'cnn'
  global_size: int = 224
  local_size: int = 96
  cnn_input_norm: Normalization = IMAGENET
  input_norm: Normalization = IMAGENET  # the ViT's

  torch_format = 'dino'

  @property
  def frozen_pattern(self) -> str | None:
    frozen = [f'{m}/head/last_layer/weight_g$' for m, on in
              (('cnn', self.cnn_norm_last_layer), ('vit', self.vit_norm_last_layer)) if on]  # fmt: skip
    return '^(' + '|'.join(frozen) + ')' if frozen else None

  @property
  def views(self):
    return dino.view_names(self.num_local)

  def required_views(self) -> set[str]:
    g, loc = self.views
    return set(g) | set(loc)

  def init(self, rng: Array, start: Any | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    start = start or {}
    ks = jax.random.split(rng, 6)
    cnn_bb, cnn_bn = dino.init_backbone(self.cnn, ks[0], start.get('cnn'))
    vit_bb, _ = dino.init_backbone(self.vit, ks[1], start.get('vit'))
    side = self.global_size // self.cnn.stride
    fmap = jnp.zeros((1, side, side, self.cnn.out_dim))
    grid = self.global_size // self.vit.patch_size
    tokens = jnp.zeros((1, grid * grid, self.vit.width))
    params = {
      'cnn': {
        'backbone': cnn_bb,
        'head': self.cnn_head.init(ks[2], jnp.zeros((1, self.cnn.out_dim)))['params'],
        'search': self.cnn_search.init(ks[3], fmap)['params'],
      },
      'vit': {
        'backbone': vit_bb,
        'head': self.vit_head.init(ks[4], jnp.zeros((1, self.vit.width)))['params'],
        'search': self.vit_search.init(ks[5], tokens)['params'],
      },
    }
    k = self.cnn_head.out_dim
    extra = {
      'teacher': params,  # teachers start as copies of the students
      'cnn_bn': cnn_bn,
      'teacher_cnn_bn': cnn_bn,
      'center': {c: jnp.zeros((1, k), jnp.float32) for c in CENTERS},
      'step': jnp.zeros((), jnp.int32),
    }
    return params, extra

  def temperatures(self, step: Array) -> tuple[Array, Array]:
    t = lambda e: dino.teacher_temperature(  # noqa: E731
      step, self.steps_per_epoch, self.warmup_teacher_temp, self.teacher_temp, e
    )
    return t(self.warmup_teacher_temp_epochs_cnn), t(self.warmup_teacher_temp_epochs_vit)

  def outputs(self, params, teachers, cnn_bn, t_cnn_bn, views: dict[str, Array], rng):
    """Students' and teachers' outputs on normalised crops (see :func:`mokd_losses`).

    views: 'cnn_global' / 'cnn_local' / 'vit_global' / 'vit_local', each [n B, H, W, 3] (crops
    stacked view-major; each model's own input normalisation). Returns (s_cnn, s_vit, t_cnn,
    t_vit, new cnn_bn, new teacher_cnn_bn).
    """
    k_g, k_l = jax.random.split(rng)
    p_c, p_v = params['cnn'], params['vit']
    has_local = 'cnn_local' in views
    # CNN student: global crops, then local crops (two BatchNorm batches, as the official code).
    s_cnn = {'head': [], 'search': []}
    local_feat = {}
    for kind in ('global', 'local') if has_local else ('global',):
      pooled, fmap, cnn_bn = dino.encode(self.cnn, p_c['backbone'], cnn_bn, views[f'cnn_{kind}'],
                                         train=True)  # fmt: skip
      s_cnn['head'].append(self.cnn_head.apply({'params': p_c['head']}, pooled))
      logits, reduced = self.cnn_search.apply({'params': p_c['search']}, fmap)
      s_cnn['search'].append(logits)
      local_feat['cnn'] = reduced
    s_vit = {'head': [], 'search': []}
    for kind, key in (('global', k_g), ('local', k_l)) if has_local else (('global', k_g),):
      cls, patches, _ = dino.encode(
        self.vit, p_v['backbone'], {}, views[f'vit_{kind}'], train=True, rng=key
      )
      s_vit['head'].append(self.vit_head.apply({'params': p_v['head']}, cls))
      s_vit['search'].append(self.vit_search.apply({'params': p_v['search']}, patches)[0])
      local_feat['vit'] = cls
    s_cnn = {k: jnp.concatenate(v) for k, v in s_cnn.items()}
    s_vit = {k: jnp.concatenate(v) for k, v in s_vit.items()}

    # Teachers: global crops only; the search heads also read global view 1 with the other
    # student's detached local-crop features as queries.
    t_c, t_v = teachers['cnn'], teachers['vit']
    pooled, fmap, t_cnn_bn = dino.encode(self.cnn, t_c['backbone'], t_cnn_bn, views['cnn_global'],
                                         train=True)  # fmt: skip
    t_cnn = {
      'head': self.cnn_head.apply({'params': t_c['head']}, pooled),
      'search': self.cnn_search.apply({'params': t_c['search']}, fmap)[0],
    }
    cls, patches, _ = dino.encode(self.vit, t_v['backbone'], {}, views['vit_global'], train=False)
    t_vit = {
      'head': self.vit_head.apply({'params': t_v['head']}, cls),
      'search': self.vit_search.apply({'params': t_v['search']}, patches)[0],
    }
    if has_local:
      b = fmap.shape[0] // 2
      n = self.num_local
      q_vit = jax.lax.stop_gradient(local_feat['vit'])  # [n B, width]
      t_cnn['query_search'] = self.cnn_search.apply(
        {'params': t_c['search']}, jnp.tile(fmap[:b], (n, 1, 1, 1)), q_vit
      )[0]
      q_cnn = jax.lax.stop_gradient(local_feat['cnn'])
      t_vit['query_search'] = self.vit_search.apply(
        {'params': t_v['search']}, jnp.tile(patches[:b], (n, 1, 1)), q_cnn
      )[0]
    t_cnn = jax.tree.map(jax.lax.stop_gradient, t_cnn)
    t_vit = jax.tree.map(jax.lax.stop_gradient, t_vit)
    return s_cnn, s_vit, t_cnn, t_vit, cnn_bn, jax.lax.stop_gradient(t_cnn_bn)

  def loss(self, params, extra, frozen, batch, rng):
    del frozen
    step = extra['step']
    m = ema.cosine_momentum(jnp.maximum(step - 1, 0), self.total_steps, self.base_momentum)
    teachers = ema.ema_update(extra['teacher'], params, m)
    g_names, l_names = self.views
    g = jnp.concatenate([batch[v] for v in g_names])
    views = {'cnn_global': self.cnn_input_norm(g), 'vit_global': self.input_norm(g)}
    if l_names:
      loc = jnp.concatenate([batch[v] for v in l_names])
      views.update(cnn_local=self.cnn_input_norm(loc), vit_local=self.input_norm(loc))
    s_cnn, s_vit, t_cnn, t_vit, cnn_bn, t_cnn_bn = self.outputs(
      params, teachers, extra['cnn_bn'], extra['teacher_cnn_bn'], views, rng
    )
    temp_cnn, temp_vit = self.temperatures(step)
    l_cnn, l_vit, centers, metrics = mokd_losses(
      s_cnn, s_vit, t_cnn, t_vit, extra['center'], temp_cnn, temp_vit,
      n_crops=2 + len(l_names), lambda_c=self.lambda_c, lambda_t=self.lambda_t,
      student_temp=self.student_temp, center_momentum=self.center_momentum,
      centering=self.centering,
    )  # fmt: skip
    new = dict(
      extra, teacher=teachers, cnn_bn=cnn_bn, teacher_cnn_bn=t_cnn_bn, center=centers,
      step=step + 1,
    )  # fmt: skip
    loss = l_cnn + l_vit
    metrics.update({'loss': loss, 'loss/cnn_total': l_cnn, 'loss/vit_total': l_vit,
                    'momentum': m, 'teacher_temp/cnn': temp_cnn, 'teacher_temp/vit': temp_vit})  # fmt: skip
    return loss, (metrics, new)

  def features(self, params, extra, frozen, images: Array, pool: str = 'cls') -> Array:
    """The ViT teacher's CLS features [B, D] (``pool`` ignored: DINO evaluates the CLS)."""
    del params, frozen, pool
    feat, _, _ = dino.encode(
      self.vit, extra['teacher']['vit']['backbone'], {}, self.input_norm(images), train=False
    )
    return feat.astype(jnp.float32)

  def cnn_features(self, params, extra, frozen, images: Array) -> Array:
    """The CNN teacher's pooled features [B, C] (its running BatchNorm statistics)."""
    del params, frozen
    feat, _, _ = dino.encode(
      self.cnn, extra['teacher']['cnn']['backbone'], extra['teacher_cnn_bn'],
      self.cnn_input_norm(images), train=False,
    )  # fmt: skip
    return feat.astype(jnp.float32)

  progress_metrics = tuple(
    (f'{label}/{model}', f'{name}/{model}')
    for model in ('cnn', 'vit')
    for label, name in dino.Dino.progress_metrics
  )

  def collapse(self, metrics) -> str | None:
    return dino.collapse_warning(metrics, self.cnn_head.out_dim, ('cnn', 'vit'))

  def extra_features(self):
    return {'teacher_cnn': self.cnn_features}  # reported as knn/teacher_cnn

  def make_optimizer(self, config, total_steps: int, steps_per_epoch: int):
    """optax multi_transform over {'cnn': SGD, 'vit': AdamW}, each with its own schedules."""
    oc, ov = config.optim_cnn, config.optim_vit
    steps = (config.batch_size, total_steps, steps_per_epoch)
    if self.cnn_search_schedule not in ('vit', 'cnn'):
      raise ValueError(
        f"cnn_search_schedule must be 'vit' or 'cnn', not {self.cnn_search_schedule!r}"
      )
    search_vit = self.cnn_search_schedule == 'vit'
    lr_c, wd_c, _ = dino.schedules(oc, *steps)
    lr_v, wd_v, peak_v = dino.schedules(ov, *steps)
    cnn_tx, _, _ = dino.optimizer_from_config(
      oc, *steps, lr={'main': lr_c, 'search': lr_v if search_vit else lr_c},
      weight_decay={'main': wd_c, 'search': wd_v if search_vit else wd_c},
      group=lambda p: 'search' if p.startswith('cnn/search/') else 'main',
      decay_all=(lambda p: p.startswith('cnn/search/')) if search_vit else None,
      frozen=self.frozen_pattern,
    )  # fmt: skip
    vit_tx, _, _ = dino.optimizer_from_config(ov, *steps, frozen=self.frozen_pattern)
    # Inside multi_transform each optimizer sees the whole tree with the other model's leaves
    # masked out, so parameter paths keep their 'cnn/' / 'vit/' prefixes.
    labels = lambda params: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}  # noqa: E731
    tx = optax.multi_transform({'cnn': cnn_tx, 'vit': vit_tx}, labels)
    return tx, lr_v, peak_v

  def export(self, params, extra):
    """The ViT teacher (encoder + DINO head), MOKD's ``teacher_vit``."""
    del params
    t = extra['teacher']['vit']
    return {
      'encoder': (self.vit, {'params': t['backbone']}, None),
      'head': (self.vit_head, {'params': t['head']}, self.vit.width),
    }

  def flops_per_example(self) -> float:
    gc, gv = (dino.backbone_flops(m, self.global_size) for m in (self.cnn, self.vit))
    lc, lv = (dino.backbone_flops(m, self.local_size) for m in (self.cnn, self.vit))
    n = self.num_local
    return 3 * (2 * (gc + gv) + n * (lc + lv)) + 2 * (gc + gv)
