r"""MoCo v3 pre-training: momentum encoder, 3-layer projector / 2-layer predictor (BatchNorm over the
global batch), symmetric InfoNCE (T = 0.2) over the global batch, momentum 0.99 -> 1 (cosine),
frozen random patch embedding, two asymmetric BYOL-style views.

  python main.py --config=configs/mocov3_pretrain.py:runlocal --workdir=/tmp/moco
  python main.py --config=configs/mocov3_pretrain.py:variant=B/16 --workdir=$WD --config.data.data_dir=$TFDS
  python main.py --config=configs/mocov3_pretrain.py:variant=S12/16 --workdir=$WD   # MoCo's ViT-S (12 heads)

Recipe (ViT-B): AdamW (0.9, 0.999), blr 1.5e-4, wd 0.1, batch 4096, 300 epochs, 40 warm-up;
views: crop (0.08, 1), colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, blur 1.0 / 0.1,
solarise 0.0 / 0.2, flip. Exports WORKDIR/export/model.pth in MoCo v3's .pth.tar layout.
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, runlocal=False, variant='B/16', checkpoint='')
  c = common.pretrain_config('mocov3_pretrain', 'mocov3', args)
  c.mocov3 = dict(temperature=0.2, momentum=0.99, proj_hidden=4096, proj_dim=256,
                  freeze_patch_embed=True)  # fmt: skip
  strong = dict(scale=(0.08, 1.0), jitter_prob=0.8, grayscale_prob=0.2)
  common.set_views(
    c,
    view1=dict(**strong, blur_prob=1.0, solarize_prob=0.0),
    view2=dict(**strong, blur_prob=0.1, solarize_prob=0.2),
  )
  c.optim = common.optim_config(base_lr=1.5e-4, weight_decay=0.1, warmup_epochs=40.0)
  c.num_epochs = 300.0
  if args.runlocal:
    common.runlocal_pretrain(c)
    c.mocov3.update(proj_hidden=256, proj_dim=64)
    # Crops of at least 30% of the 32 px image (ImageNet's 8% would be 9 px, a fragment of a
    # stroke): measured with 1,000 steps on the embedded digits (issue 17, docs/results.md).
    for v in c.data.views.values():
      v.scale = (0.3, 1.0)
  return c
