r"""End-to-end fine-tuning of any checkpoint the project produces or converts (MAE recipe).

  python main.py --config=configs/finetune.py:runlocal --workdir=/tmp/ft        # digits, scratch
  python main.py --config=configs/finetune.py:checkpoint=WORKDIR/export/model --workdir=$WD \
    --config.data.data_dir=gs://BUCKET/tfds                                       # ViT-B, MAE recipe
  python main.py --config=configs/finetune.py:checkpoint=DIR,size=L --workdir=$WD  # ViT-L recipe
  python main.py --config=configs/finetune.py:checkpoint=DIR,recipe=paper --workdir=$WD

Recipes (REFERENCE section 3 and the MOMA paper):
  mae (B): 100 epochs, blr 5e-4, layer decay 0.65, drop path 0.1; (L): 50 epochs, blr 1e-3, layer
    decay 0.75, drop path 0.2; AdamW (0.9, 0.999), wd 0.05, batch 1024, 5 warm-up epochs, cosine to
    1e-6; mixup 0.8, cutmix 1.0, label smoothing 0.1, RandAugment m9 std 0.5, random erasing 0.25;
    global-average pool + fc_norm; head init std 2e-5; no decay on 1-D params / CLS / pos.
  paper: MOMA's own: lr 1.5e-3 at batch 1024 (read as the absolute lr: blr 3.75e-4), betas
    (0.9, 0.999), wd 0.05, 100 epochs, 5 warm-up, AutoAugment + CutMix (no mixup), layer decay
    0.65 kept from MAE (the paper does not say).
Top-1 / top-5 on the full validation split at the end, every example counted once.
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, runlocal=False, checkpoint='', recipe='mae', size='B')
  c = common.classification_config('finetune', args)
  c.batch_size = 1024
  c.optim = common.optim_config(base_lr=5e-4, min_lr=1e-6, layer_decay=0.65, warmup_epochs=5.0)
  c.num_epochs = 100.0
  if args.size == 'L':
    c.optim.update(base_lr=1e-3, layer_decay=0.75)
    c.classifier.drop_path = 0.2
    c.num_epochs = 50.0
  elif args.size != 'B':
    raise ValueError(f"size={args.size!r}: the MAE recipe has 'B' and 'L'")
  if args.recipe == 'paper':
    c.optim.base_lr = 1.5e-3 * 256 / 1024
    common.set_views(c, image=dict(scale=(0.08, 1.0), autoaugment=True))
    c.classifier.mixup_alpha = 0.0
  elif args.recipe != 'mae':
    raise ValueError(f"recipe={args.recipe!r}; one of 'mae', 'paper'")
  if args.runlocal:
    common.runlocal_classification(c)
    c.optim.update(base_lr=2e-3, layer_decay=0.75 if args.checkpoint else 1.0)
    c.classifier.pool = 'cls'
  return c
