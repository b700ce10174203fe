r"""RC-MAE: MAE plus an EMA teacher of the whole MAE (encoder and decoder) fed the same mask;
pixel reconstruction + MSE consistency between student and teacher predictions on masked patches.

  python main.py --config=configs/rc_mae.py:runlocal --workdir=/tmp/rcmae
  python main.py --config=configs/rc_mae.py:variant=B/16 --workdir=$WD --config.data.data_dir=$TFDS

EMA momentum 0.996 (constant; rc_mae.schedule='cosine' raises it to 1), consistency weight 1.
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, runlocal=False, variant='B/16', checkpoint='')
  c = common.pretrain_config('rc_mae', 'rc_mae', args)
  c.rc_mae = dict(momentum=0.996, schedule='constant', weight=1.0)
  c.num_epochs = 800.0
  if args.runlocal:
    common.runlocal_pretrain(c)
  return c
