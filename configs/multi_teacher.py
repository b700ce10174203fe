r"""MOMA: MoCo v3 + MAE teachers -> a randomly initialised student of any size.

L = alpha * SmoothL1(P(S(x masked)), N(T_mae(x))) + beta * SmoothL1(P(S(x masked)), N(T_moco(x)))
The paper's strategy is a plain average: alpha = beta = 0.5. The MoCo teacher is matched with the
strong-augmented view, the MAE teacher with the plain masked view.

  # the shipped tiny teachers (MAE milli/4, the stronger of the two shipped MAEs, and MoCo v3
  # mu/4) -> a random mu/4 student, ~4 min on 2 CPU cores, with the small-scale recipe
  # (configs/common.py, small_scale_recipe): k-NN 44.4 +- 1.5, linear 72.3 +- 1.3 (3 seeds;
  # random init 32.5 / 61.8, MAE from scratch at the same lr 35.8 / 69.4; with the MAE mu teacher,
  # mae=mae_mu: 40.3 / 67.8; docs/results.md). mae=/moco= take a file, 'random' or a shipped name:
  python main.py --config=configs/multi_teacher.py:runlocal --workdir=/tmp/multi
  python main.py --config=configs/multi_teacher.py:runlocal,recipe=paper --workdir=/tmp/multi_paper
  python main.py --config=configs/multi_teacher.py:variant=S/16 --workdir=gs://BUCKET/multi_s16 \
    --config.teachers.mae.checkpoint=ckpt/mae_b16 --config.teachers.moco.checkpoint=ckpt/mocov3_b16 \
    --config.data.data_dir=gs://BUCKET/tfds
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(
    arg, runlocal=False, variant='B/16', mae='', moco='', alpha=0.5, beta=0.5, recipe=''
  )
  c = common.moma_config('multi_teacher', args)
  c.teachers.mae = common.teacher(args.mae, weight=args.alpha, student_view='masked')
  c.teachers.moco = common.teacher(args.moco, weight=args.beta, student_view='strong')
  c.student.variant = args.variant
  if args.runlocal:  # the shipped tiny teachers (random ones: mae=random,moco=random)
    c.student.variant = 'mu/4'
    c.teachers.mae.update(common.shipped_teacher(args.mae, 'mae_milli'))
    c.teachers.moco.update(common.shipped_teacher(args.moco, 'mocov3_mu'))
  return c
