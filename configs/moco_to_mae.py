r"""MOMA: MoCo v3 teacher -> pre-trained MAE student (the paper's best single-teacher setting).

The student also gets MoCo's strong augmentation ("do the task the teacher was trained on").

  # on the embedded data with the shipped tiny teachers (teachers/), a few minutes on a CPU:
  python main.py --config=configs/moco_to_mae.py:runlocal --workdir=/tmp/moco_to_mae
  # ImageNet, ViT-B teacher and student (converted with python -m convert):
  python main.py --config=configs/moco_to_mae.py --workdir=gs://BUCKET/moco_to_mae \
    --config.teachers.moco.checkpoint=ckpt/mocov3_b16 --config.student.checkpoint=ckpt/mae_b16 \
    --config.data.data_dir=gs://BUCKET/tfds
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, runlocal=False, teacher='', student='')
  c = common.moma_config('moco_to_mae', args)
  c.teachers.moco = common.teacher(args.teacher, student_view='strong')
  c.student.checkpoint = args.student
  if args.runlocal:  # the shipped tiny MoCo v3 teacher and MAE student (random: teacher=random)
    c.teachers.moco.update(variant='mu/4', checkpoint=common.shipped(args.teacher, 'mocov3_mu'))
    c.student.checkpoint = common.shipped(args.student, 'mae_mu')
  return c
