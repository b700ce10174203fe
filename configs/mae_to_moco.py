r"""MOMA: MAE teacher -> pre-trained MoCo v3 student, no strong augmentation.

  python main.py --config=configs/mae_to_moco.py:runlocal --workdir=/tmp/mae_to_moco
  # runlocal: the small-scale recipe (configs/common.py, small_scale_recipe), 3 seeds: k-NN 52.8% ->
  # 45.0 +- 0.5, linear 74.3% -> 69.6 +- 0.9: below its start, toward a teacher that is weaker than
  # the student here (the shipped MAE mu: 39.3 / 70.3); the paper's loss ends at 35.0 / 67.9:
  python main.py --config=configs/mae_to_moco.py:runlocal,recipe=paper --workdir=/tmp/mae_to_moco_p
  python main.py --config=configs/mae_to_moco.py --workdir=gs://BUCKET/mae_to_moco \
    --config.teachers.mae.checkpoint=ckpt/mae_l16 --config.student.checkpoint=ckpt/mocov3_b16 \
    --config.data.data_dir=gs://BUCKET/tfds
(Table 1's 84.2: ViT-L MAE teacher, ViT-B MoCo v3 student.)
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, runlocal=False, teacher='', student='', recipe='')
  c = common.moma_config('mae_to_moco', args)
  c.teachers.mae = common.teacher(args.teacher, student_view='masked')
  c.student.checkpoint = args.student
  if args.runlocal:  # the shipped tiny MAE teacher and MoCo v3 student (random: teacher=random)
    c.teachers.mae.update(common.shipped_teacher(args.teacher, 'mae_mu'))
    c.student.checkpoint = common.shipped(args.student, 'mocov3_mu')
  return c
