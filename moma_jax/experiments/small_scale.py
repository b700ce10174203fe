r"""Offline small-scale replication of the MOMA paper's ablations on the embedded digits dataset.

  python -m moma_jax.experiments.small_scale --workdir=/tmp/small_scale       # ~20 min, 2 CPU cores
  python -m moma_jax.experiments.small_scale --workdir=/tmp/ss --tables t2 --seeds 1 --steps 20
  python -m moma_jax.experiments.small_scale --workdir=/tmp/ss_small --recipe small --tables t2 t4

Every run is a ``main.py`` job (the configs' ``:runlocal`` recipe: batch 64, AdamW, the same fixed
step budget for every row) on the shipped tiny teachers (``teachers/``, loaded through
``convert/``), followed by the same evaluation for every encoder, teachers included:
features = [CLS, mean of patch tokens] after the final norm on the full 32 px image, then
  k-NN   k = 20, T = 0.07, cosine (DINO's protocol), train split as the memory bank;
  linear logistic regression (scikit-learn, standardised features, C = 1, the same for every row);
both scored on the held-out test split (720 images of digits never seen in training).

Tables (analogues of the paper's; sizes pico < mu < milli play S < B < L):
  t2  MoCo -> MAE, MAE -> MoCo, Multi (random student), MAE from scratch for the same budget (no
      teacher), and the teachers themselves.
  t3  MAE teachers {milli, mu} -> pre-trained MoCo v3 students {mu, pico}.
  t4  MoCo -> MAE at mask ratio 75, 80, 85, 90, 95 %.
  abl the MoCo teacher without the strong-augmentation student view; masking the teacher.
  mech a supervised mu/4 teacher (trained with the labels, not self-supervised) -> the pre-trained
      MAE mu student and a random mu student: the student must move toward a clearly better
      teacher, whatever the SSL teachers are worth.
  cls the lever the mechanism check found (align the CLS token only) on the three settings, and
      runlocal's small-scale recipe built on it (configs/common.py, small_scale_recipe).
``--recipe small`` reruns t2-t4 and abl with the MOMA configs' small-scale recipe instead of the
paper's loss (mech and cls change one setting of the paper's loss, so they stay with it).
The command is resumable: finished runs are read back from WORKDIR/results.json. It writes
WORKDIR/results.md, results.json and the PNG plots (loss curves, accuracy vs mask ratio).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Any

import jax
import numpy as np

from moma_jax import hardware, storage
from moma_jax.experiments import teachers

STEPS = 600  # per run; every row gets the same budget
TABLES = ('t2', 't3', 't4', 'abl', 'mech', 'cls')
MASK_RATIOS = (0.75, 0.8, 0.85, 0.9, 0.95)


@dataclasses.dataclass(frozen=True)
class Run:
  key: str  # unique, also the run directory
  config: str  # module under configs/ ('' for an evaluation-only row)
  overrides: tuple[tuple[str, Any], ...] = ()
  teacher: str = ''  # evaluation-only rows: the shipped teacher to evaluate
  random_init: str = ''  # evaluation-only rows: this ViT variant randomly initialised (per seed)

  @property
  def seeded(self) -> bool:
    """Whether the row has one result per seed (training runs and random inits)."""
    return bool(self.config or self.random_init)


@dataclasses.dataclass(frozen=True)
class Row:
  table: str
  label: str
  run: Run


def plan(
  tables: tuple[str, ...], mask_ratios: tuple[float, ...] = MASK_RATIOS, recipe: str = 'paper'
) -> list[Row]:
  """The table rows; a run shared by several tables (MoCo -> MAE at 90%) is trained once.
  ``recipe``: the MOMA configs' (configs/common.py, moma_recipe): 'paper' replicates the paper's
  loss (align both, mask 90%, runlocal's lr) and every mech / cls row changes one setting of it;
  'small' reruns t2-t4 and abl under runlocal's small-scale recipe."""
  T = teachers.path  # noqa: N806
  moco2mae, mae2moco, multi_milli = (
    f'{n}:recipe={recipe}' for n in ('moco_to_mae', 'mae_to_moco', 'multi_teacher')
  )
  multi = f'{multi_milli},mae=mae_mu'  # the paper's Multi: both teachers of one size (mu)
  moco_to_mae = Run('moco_to_mae', moco2mae)
  mae_to_moco = Run('mae_to_moco', mae2moco)
  mae_scratch = Run('mae_scratch', 'mae_pretrain')
  rows = []
  if 't2' in tables:
    rows += [
      Row('t2', 'MoCo v3 mu: teacher of MoCo -> MAE, start of MAE -> MoCo', _shipped('mocov3_mu')),
      Row('t2', 'MAE mu: teacher of MAE -> MoCo, start of MoCo -> MAE', _shipped('mae_mu')),
      Row('t2', 'MoCo -> MAE (pre-trained MAE mu student)', moco_to_mae),
      Row('t2', 'MAE -> MoCo (pre-trained MoCo v3 mu student)', mae_to_moco),
      Row('t2', 'Multi: MoCo + MAE -> random mu student', Run('multi', multi)),
      Row('t2', 'MAE from scratch, same budget, no teacher', mae_scratch),
      Row('t2', 'random-init mu/4 (no training; the floor)', _random('mu/4')),
    ]  # fmt: skip
  if 't3' in tables:
    rows += [
      Row('t3', 'MAE milli teacher (no distillation)', _shipped('mae_milli')),
      Row('t3', 'MAE mu teacher (no distillation)', _shipped('mae_mu')),
      Row('t3', 'MoCo v3 mu student before distillation', _shipped('mocov3_mu')),
      Row('t3', 'MoCo v3 pico student before distillation', _shipped('mocov3_pico')),
      Row('t3', 'random-init pico/4 (no training; the floor)', _random('pico/4')),
      Row('t3', 'random-init mu/4 (no training; the floor)', _random('mu/4')),
    ]
    for t_name, t_label in (('mae_milli', 'milli'), ('mae_mu', 'mu')):
      for s_name, s_label in (('mocov3_mu', 'mu'), ('mocov3_pico', 'pico')):
        run = mae_to_moco
        if (t_name, s_name) != ('mae_mu', 'mocov3_mu'):
          variant = teachers.RECIPES[t_name].variant
          run = Run(f'mae_{t_label}_to_moco_{s_label}', mae2moco,
                    (('teachers.mae.checkpoint', T(t_name)), ('teachers.mae.variant', variant),
                     ('student.checkpoint', T(s_name))))  # fmt: skip
        rows.append(Row('t3', f'MAE {t_label} -> MoCo v3 {s_label}', run))
  if 't4' in tables:
    from configs import common

    default = common.shortened_runlocal(
      moco2mae, 1, checkpoint_every=1, log_every=1
    ).moma.mask_ratio
    for r in sorted(mask_ratios):
      run = moco_to_mae
      if r != default:
        run = Run(f'moco_to_mae_mask{round(100 * r)}', moco2mae, (('moma.mask_ratio', r),))
      rows.append(Row('t4', f'mask {100 * r:.0f}%', run))
  if 'abl' in tables:
    rows += [
      Row('abl', 'MoCo -> MAE (student also gets the strong view)', moco_to_mae),
      Row('abl', 'no strong-augmentation view for the MoCo teacher',
          Run('moco_to_mae_no_strong', moco2mae, (('teachers.moco.student_view', 'masked'),))),
      Row('abl', 'teacher masked too (sees only the visible patches)',
          Run('moco_to_mae_masked_teacher', moco2mae, (('moma.mask_teacher', True),))),
    ]  # fmt: skip
  if 'mech' in tables:  # issue 29: does a student move toward a teacher that is clearly better?
    sup = ('teachers.mae.checkpoint', T('supervised_mu'))

    def sup_to_mae(key: str, label: str, *overrides) -> Row:
      run = Run(key, mae2moco, (sup, ('student.checkpoint', T('mae_mu')), *overrides))
      return Row('mech', f'supervised -> pre-trained MAE mu{label}', run)

    rows += [
      Row('mech', 'supervised mu teacher (trained with labels)', _shipped('supervised_mu')),
      Row('mech', 'MAE mu student before distillation', _shipped('mae_mu')),
      Row('mech', 'random-init mu/4 (no training; the floor)', _random('mu/4')),
      sup_to_mae('sup_to_mae', ' student'),
      Row('mech', 'supervised -> random mu student',
          Run('sup_to_random', mae2moco, (sup, ('student.checkpoint', '')))),
    ]  # fmt: skip
    for r in (0.75, 0.0):  # how much of what is missing is the 6 of 64 patches the student sees
      rows.append(sup_to_mae(f'sup_to_mae_mask{round(100 * r)}', f' student, mask {100 * r:.0f}%',
                             ('moma.mask_ratio', r)))  # fmt: skip
    for stats in ('center', 'standardize'):  # the image-specific part of the target, weighted up
      for r in (0.9, 0.0):
        rows.append(sup_to_mae(f'sup_to_mae_{stats}_mask{round(100 * r)}',
                               f', mask {100 * r:.0f}%, target_stats={stats}',
                               ('moma.mask_ratio', r), ('moma.target_stats', stats)))  # fmt: skip
    # The class lives in the teacher's CLS token: 1 of the 7 (mask 90%) or 65 tokens of the loss.
    for r in (0.9, 0.0):
      rows.append(sup_to_mae(f'sup_to_mae_cls_mask{round(100 * r)}',
                             f', mask {100 * r:.0f}%, align CLS only',
                             ('moma.mask_ratio', r), ('moma.align', 'cls')))  # fmt: skip
    rows.append(sup_to_mae('sup_to_mae_lr4', ', mask 90%, lr x4 (peak 1e-3)',
                           ('optim.base_lr', 4e-3)))  # fmt: skip
    rows.append(sup_to_mae('sup_to_mae_cls_lr4', ', mask 90%, align CLS only, lr x4',
                           ('moma.align', 'cls'), ('optim.base_lr', 4e-3)))  # fmt: skip
  if 'cls' in tables:  # the mechanism check's lever on the shipped SSL teachers
    cls = ('moma.align', 'cls')
    small = (cls, ('moma.mask_ratio', 0.5), ('optim.base_lr', 4e-3))  # runlocal's small recipe

    def m2m(key: str, label: str, *overrides) -> Row:
      return Row('cls', f'MoCo -> MAE, {label}', Run(key, moco2mae, overrides))

    rows += [
      Row('cls', 'MoCo v3 mu teacher', _shipped('mocov3_mu')),
      Row('cls', 'MAE mu (student of MoCo -> MAE) before', _shipped('mae_mu')),
      Row('cls', 'MoCo -> MAE, align both (the paper)', moco_to_mae),
      m2m('moco_to_mae_cls', 'align CLS only', cls),
      Row('cls', 'MAE -> MoCo, align both (the paper)', mae_to_moco),
      Row('cls', 'MAE -> MoCo, align CLS only', Run('mae_to_moco_cls', mae2moco, (cls,))),
      Row('cls', 'Multi -> random mu, align CLS only', Run('multi_cls', multi, (cls,))),
      m2m('moco_to_mae_cls_center', 'align CLS only, target_stats=center', cls,
          ('moma.target_stats', 'center')),
      m2m('moco_to_mae_cls_mask0', 'align CLS only, mask 0% (is it the teacher?)', cls,
          ('moma.mask_ratio', 0.0)),
      m2m('moco_to_mae_cls_mask50', 'align CLS only, mask 50%', cls, ('moma.mask_ratio', 0.5)),
      m2m('moco_to_mae_cls_mask25', 'align CLS only, mask 25%', cls, ('moma.mask_ratio', 0.25)),
      m2m('moco_to_mae_cls_mask50_lr4', 'align CLS only, mask 50%, lr x4', *small),
      m2m('moco_to_mae_lr4', 'align both, lr x4 (peak 1e-3)', ('optim.base_lr', 4e-3)),
      # Multi with command 1's small-scale recipe, against MAE from scratch at both lrs.
      Row('cls', 'Multi -> random mu, align CLS only, mask 50%, lr x4',
          Run('multi_cls_mask50_lr4', multi, small)),
      Row('cls', 'Multi -> random mu, align both, mask 50%, lr x4',
          Run('multi_mask50_lr4', multi, (('moma.mask_ratio', 0.5), ('optim.base_lr', 4e-3)))),
      Row('cls', 'MAE -> MoCo, align CLS only, mask 50%, lr x4',
          Run('mae_to_moco_cls_mask50_lr4', mae2moco, small)),
      # Multi with the stronger MAE teacher (milli, runlocal's default since 2026-12-07), and
      # each of its teachers alone -> the same random student.
      Row('cls', 'Multi (MAE milli + MoCo v3 mu) -> random mu, align CLS only, mask 50%, lr x4',
          Run('multi_milli_cls_mask50_lr4', multi_milli, small)),
      Row('cls', 'MAE milli alone -> random mu, align CLS only, mask 50%, lr x4',
          Run('mae_milli_to_random_cls_mask50_lr4', f'{mae2moco},teacher=mae_milli,student=random',
              (*small, ('student.variant', 'mu/4')))),
      Row('cls', 'MoCo v3 mu alone -> random mu, align CLS only, mask 50%, lr x4',
          Run('moco_to_random_cls_mask50_lr4', f'{moco2mae},student=random',
              (*small, ('student.variant', 'mu/4')))),
      Row('cls', 'MAE from scratch, same budget, no teacher', mae_scratch),
      Row('cls', 'MAE from scratch, lr x4', Run('mae_scratch_lr4', 'mae_pretrain',
                                                 (('optim.base_lr', 4e-3),))),
      Row('cls', 'random-init mu/4 (no training; the floor)', _random('mu/4')),
    ]  # fmt: skip
  return rows


def _shipped(name: str) -> Run:
  """An evaluation-only row: a shipped teacher file as it is."""
  return Run(f'teacher_{name}', '', teacher=name)


def _random(variant: str) -> Run:
  """An evaluation-only row: ``variant`` randomly initialised, one init per seed."""
  return Run(f'random_{variant.replace("/", "_")}', '', random_init=variant)


def unique_runs(rows: list[Row]) -> list[Run]:
  return list({row.run.key: row.run for row in rows}.values())


def make_config(run: Run, seed: int, steps: int):
  """The run's runlocal config at ``steps``; its own k-NN is off: every encoder gets the same
  evaluation below instead."""
  from configs import common

  c = common.shortened_runlocal(
    run.config, steps, checkpoint_every=steps, log_every=max(1, steps // 30),
    overrides=run.overrides,
  )  # fmt: skip
  c.seed = seed
  return c


# --- evaluation ------------------------------------------------------------------------------------


def _evaluator():
  """The trainer's k-NN / linear-probe evaluator as runlocal configures it (digits train -> test,
  32 px, batch 256): every number here is the one a run's summary would print."""
  from moma_jax import sharding
  from moma_jax.evaluators.knn import KnnEvaluator

  return KnnEvaluator(
    dataset='digits', train_split='train', eval_split='test', image_size=32, batch_size=256,
    mesh=sharding.make_mesh({'data': -1}), data_axes=('data',), resize_ratio=1.0, linear=True,
  )  # fmt: skip


def _scores(features_fn, params) -> dict[str, float]:
  r = dict(_evaluator().run(features_fn, params))
  return {'knn': r['knn/top1'], 'linear': r['knn/linear']}


def evaluate_encoder(model, variables, norm) -> dict[str, float]:
  """k-NN and linear probe of an encoder on the embedded digits (train -> test): [CLS, mean of
  patch tokens] after the final norm, the images normalised with the model's own statistics."""
  from moma_jax.evaluators.knn import encoder_features

  fn = encoder_features(model, pool='cls+mean', mean=norm.mean, std=norm.std)
  return _scores(fn, variables)


def evaluate_checkpoint(path: str) -> dict[str, float]:
  from moma_jax.builders import encoder_of, load_checkpoint

  loaded = load_checkpoint(path)
  return evaluate_encoder(*encoder_of(loaded, path), loaded.normalization)


def evaluate_random_init(variant: str, seed: int = 0) -> dict[str, float]:
  """The floor of a trained encoder: the same architecture randomly initialised, same evaluation
  (ImageNet statistics, as the trainer's random-init row)."""
  from moma_jax.builders import random_vit
  from moma_jax.models import pretrained

  model, variables = random_vit(variant, 32, 'float32', jax.random.key(seed))
  return evaluate_encoder(model, variables, pretrained.IMAGENET)


def raw_pixels() -> dict[str, float]:
  from moma_jax.evaluators.knn import pixel_features

  return _scores(pixel_features(), None)


def execute(run: Run, seed: int, steps: int, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) one run and evaluates its exported encoder."""
  from moma_jax import train

  t0 = time.time()
  if not run.config:  # evaluation only: a random init (per seed) or a shipped teacher
    if run.random_init:
      result = evaluate_random_init(run.random_init, seed)
    else:
      result = evaluate_checkpoint(teachers.path(run.teacher))
    result.update(wall_s=time.time() - t0, history=[])
    return result
  rundir = os.path.join(workdir, 'runs', run.key, f'seed{seed}')
  train.train_and_evaluate(make_config(run, seed, steps), rundir)
  result = evaluate_checkpoint(os.path.join(rundir, 'export', 'model'))
  with open(os.path.join(rundir, 'final_metrics.json')) as f:
    history = [(h['step'], h['loss']) for h in json.load(f)['history']]
  result.update(wall_s=time.time() - t0, history=history)
  return result


# --- report ----------------------------------------------------------------------------------------


def summary(values: list[float]) -> str:
  pct = [100 * v for v in values]
  if len(pct) == 1:
    return f'{pct[0]:.1f}'
  return f'{statistics.mean(pct):.1f} ± {statistics.stdev(pct):.1f}'


TITLES = {
  't2': 'Table 2 analogue: teachers and settings (mu/4 models)',
  't3': 'Table 3 analogue: teacher size -> student size (MAE teachers, pre-trained MoCo v3 students)',
  't4': 'Table 4 analogue: mask ratio (MoCo -> MAE)',
  'abl': 'Ablations (MoCo -> MAE)',
  'mech': 'Mechanism check: a supervised teacher (mask 90%)',
  'cls': 'The CLS token alone as the target (align=cls), shipped SSL teachers, mask 90%',
}


def report(rows: list[Row], results: dict, floor: dict | None, env: dict) -> str:
  lines = [
    '<!-- written by python -m moma_jax.experiments.small_scale -->',
    f'Command: `{env["command"]}`  ',
    f'{env["steps"]} steps x batch 64 per training run; jax {env["jax"]}, {env["machine"]}; '
    f'total wall time {env["total_min"]:.1f} min.',
    '',
    (
      f'Raw-pixel floor: k-NN {100 * floor["knn"]:.1f}%, linear {100 * floor["linear"]:.1f}%. '
      if floor
      else 'Raw-pixel floor: not computed (--no-floor). '
    )
    + 'Cells: mean ± sample std over seeds, top-1 % on the 720 test images.',
  ]
  for table in TABLES:
    t_rows = [r for r in rows if r.table == table and results.get(r.run.key)]
    if not t_rows:
      continue
    lines += ['', f'### {TITLES[table]}', '',
              '| run | seeds | k-NN top-1 % | linear top-1 % | wall s / run |', '|---|---|---|---|---|']  # fmt: skip
    for row in t_rows:
      res = results[row.run.key]
      per_seed = [res[s] for s in sorted(res)]
      knn = [r['knn'] for r in per_seed]
      lin = [r['linear'] for r in per_seed]
      wall = statistics.mean(r['wall_s'] for r in per_seed)
      lines.append(
        f'| {row.label} | {len(per_seed)} | {summary(knn)} | {summary(lin)} | {wall:.0f} |'
      )
  return '\n'.join(lines) + '\n'


def plots(rows: list[Row], results: dict, out: str) -> list[str]:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  paths = []
  curves = {}  # run key -> label, the training runs of t2 and the ablations
  for row in rows:
    if row.run.config and row.table in ('t2', 'abl') and results.get(row.run.key):
      curves.setdefault(row.run.key, row.label)
  if curves:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for c, (key, label) in enumerate(curves.items()):
      for i, (_, res) in enumerate(sorted(results[key].items())):
        if res['history']:
          steps, loss = zip(*res['history'], strict=True)
          ax.plot(steps, loss, color=f'C{c}', alpha=0.8, label=label if i == 0 else None)
    ax.set_yscale('log')
    ax.set(xlabel='step', ylabel='training loss', title='loss curves (every seed)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out, 'loss_curves.png'))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  mask_runs = [row.run for row in rows if row.table == 't4']
  if len(mask_runs) > 1:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ratios = [dict(r.overrides).get('moma.mask_ratio', 0.9) for r in mask_runs]
    for metric, marker in (('knn', 'o'), ('linear', 's')):
      means, stds = [], []
      for r in mask_runs:
        vals = [100 * v[metric] for v in results.get(r.key, {}).values()]
        means.append(np.mean(vals) if vals else np.nan)
        stds.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
      ax.errorbar(
        [100 * x for x in ratios], means, yerr=stds, marker=marker, capsize=3, label=metric
      )
    ax.set(xlabel='mask ratio %', ylabel='top-1 %', title='MoCo -> MAE: accuracy vs mask ratio')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out, 'mask_ratio.png'))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  return paths


def load_results(res_path: str, steps: int, recipe: str = 'paper') -> dict[str, Any]:
  """The state of a resumable experiment ({'steps', 'recipe', 'results'}): read back from
  ``res_path`` if it exists (refused if its runs had another length or recipe), else empty."""
  if not os.path.exists(res_path):
    return {'steps': steps, 'recipe': recipe, 'results': {}}
  with open(res_path) as f:
    state = json.load(f)
  state.setdefault('recipe', 'paper')  # written before the small-scale recipe existed
  if (state['steps'], state['recipe']) != (steps, recipe):
    raise SystemExit(
      f'error: {res_path} holds {state["steps"]}-step runs of recipe {state["recipe"]}, not '
      f'{steps} of {recipe}; use another --workdir'
    )
  return state


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--workdir', required=True)
  p.add_argument('--tables', nargs='+', choices=TABLES, default=list(TABLES))
  p.add_argument('--seeds', type=int, default=3, help='seeds per training run')
  p.add_argument('--steps', type=int, default=STEPS, help='training steps per run')
  p.add_argument('--recipe', choices=('paper', 'small'), default='paper',
                 help="the MOMA configs' recipe; 'small' for t2 t3 t4 abl only")  # fmt: skip
  p.add_argument('--no-floor', action='store_true', help='skip the raw-pixel floor (~1 min)')
  p.add_argument('--mask-ratios', type=float, nargs='+', default=list(MASK_RATIOS), help='t4 rows')
  p.add_argument('--only', nargs='+', default=None, help='train only these run keys (the report '
                 'shows every row with results)')  # fmt: skip
  a = p.parse_args(argv)
  if a.recipe != 'paper' and {'mech', 'cls'} & set(a.tables):
    raise SystemExit(
      f'error: --recipe {a.recipe} with --tables mech / cls: those rows change one setting of the '
      "paper's loss; pick --tables from t2 t3 t4 abl"
    )
  hardware.quiet_libtpu()  # before JAX starts: no libtpu start-up errors without a TPU
  missing = [n for n in teachers.RECIPES if not os.path.isfile(teachers.path(n))]
  if missing:
    raise SystemExit(
      f'error: shipped teachers missing: {", ".join(teachers.path(n) for n in missing)}; '
      'run python -m moma_jax.experiments.teachers'
    )
  os.makedirs(a.workdir, exist_ok=True)
  rows = plan(tuple(a.tables), tuple(a.mask_ratios), a.recipe)
  res_path = os.path.join(a.workdir, 'results.json')
  state = load_results(res_path, a.steps, a.recipe)
  results = state['results']
  t_start = time.time()
  for run in unique_runs(rows):
    if a.only and run.key not in a.only:
      continue
    for seed in range(a.seeds if run.seeded else 1):
      if str(seed) in results.get(run.key, {}):
        continue
      print(f'[{time.time() - t_start:6.0f}s] {run.key} seed {seed}', flush=True)
      res = execute(run, seed, a.steps, a.workdir)
      results.setdefault(run.key, {})[str(seed)] = res
      print(f'  k-NN {100 * res["knn"]:.1f}%  linear {100 * res["linear"]:.1f}%  '
            f'({res["wall_s"]:.0f}s)', flush=True)  # fmt: skip
      storage.write_text_atomic(res_path, json.dumps(state))
  if not a.no_floor:
    state.setdefault('floor', raw_pixels())
  total = sum(res['wall_s'] for per in results.values() for res in per.values())
  env = {
    'command': 'python -m moma_jax.experiments.small_scale --workdir=DIR '
    + ' '.join(f'--{k.replace("_", "-")} {" ".join(map(str, v)) if isinstance(v, list) else v}'
               for k, v in vars(a).items() if k not in ('workdir', 'no_floor', 'only'))
    + (' --no-floor' if a.no_floor else ''),
    'steps': a.steps, 'jax': jax.__version__,
    'machine': f'{platform.machine()}, {os.cpu_count()} cores', 'total_min': total / 60,
  }  # fmt: skip
  text = report(rows, results, state.get('floor'), env)
  storage.write_text_atomic(os.path.join(a.workdir, 'results.md'), text)
  storage.write_text_atomic(res_path, json.dumps(state))
  paths = plots(rows, results, a.workdir)
  print(text)
  print('wrote', os.path.join(a.workdir, 'results.md'), *paths)
  return state


if __name__ == '__main__':
  main()
