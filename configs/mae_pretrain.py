r"""MAE pre-training: 75% masking, decoder (512 wide, 8 blocks), norm-pix loss on masked patches.

  python main.py --config=configs/mae_pretrain.py:runlocal --workdir=/tmp/mae
  python main.py --config=configs/mae_pretrain.py:variant=B/16 --workdir=$WD --config.data.data_dir=$TFDS
  # continue from a converted official checkpoint with its decoder (python -m convert on *_full.pth):
  python main.py --config=configs/mae_pretrain.py:checkpoint=ckpt/mae_b16_full --workdir=$WD

Recipe (MAE): AdamW (0.9, 0.95), wd 0.05, blr 1.5e-4, batch 4096, 800 epochs, 40 warm-up, cosine;
random resized crop (0.2, 1) + flip. Exports WORKDIR/export/model.pth in MAE's format with the
decoder (as *_full.pth).
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, runlocal=False, variant='B/16', checkpoint='')
  c = common.pretrain_config('mae_pretrain', 'mae', args)
  c.num_epochs = 800.0
  if args.runlocal:
    common.runlocal_pretrain(c)
  return c
