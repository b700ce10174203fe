r"""DMAE: MAE + distillation of an intermediate block of a frozen teacher fed the same visible
tokens (teacher block 18 of a ViT-L, student block 9 of a ViT-B), L1 between L2-normalised
features through a linear projector, plus the MAE pixel loss (weight 1); mask 75%, 100 epochs.

  python main.py --config=configs/dmae.py:runlocal --workdir=/tmp/dmae
  python main.py --config=configs/dmae.py:teacher=ckpt/mae_l16 --workdir=$WD --config.data.data_dir=$TFDS
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, runlocal=False, variant='B/16', checkpoint='', teacher='')
  c = common.pretrain_config('dmae', 'dmae', args)
  c.dmae = dict(teacher=args.teacher, teacher_variant='L/16', teacher_dtype='float32',
                teacher_block=18, student_block=9, weight=1.0)  # fmt: skip
  c.num_epochs = 100.0
  if args.runlocal:
    common.runlocal_pretrain(c)
    # The shipped tiny MAE milli/4 (4 blocks) plays the paper's MAE ViT-L: its block 3 of 4
    # (18 of 24) -> the mu/4 student's block 1 of 2 (9 of 12). teacher=random for a random one.
    c.dmae.update(teacher=common.shipped(args.teacher, 'mae_milli'), teacher_variant='milli/4',
                  teacher_block=3, student_block=1)  # fmt: skip
  return c
