r"""MOKD: a ResNet and a ViT trained together, each by DINO against its own EMA teacher, and
distilled into each other (cross-distillation + cross-attention feature search).

  python main.py --config=configs/mokd.py:runlocal --workdir=/tmp/mokd
  python main.py --config=configs/mokd.py --workdir=$WD --config.data.data_dir=$TFDS
  python main.py --config=configs/mokd.py:cnn=resnet18,vit=Ti/16 --workdir=$WD

Recipe (the official README's command, ResNet-50 + ViT-S/16): batch 256, 100 epochs, 10 warm-up
epochs; CNN: SGD momentum 0.9, lr 0.1 x batch / 256 -> 0.0048 (cosine), weight decay 1e-4; ViT:
AdamW, lr 3e-4 x batch / 256 -> 1e-5, weight decay 0.04 -> 0.4, drop path 0.1; per-tensor gradient
clipping 3.0 on both, last layers frozen in epoch 1, momentum 0.996 -> 1; 65536 prototypes,
CNN head with a normalised last layer, ViT head without; teacher temperature 0.04 -> 0.07 over 50
(CNN self terms) / 30 (the rest) epochs, student 0.1; search heads: 3 blocks, 384 wide, 6 heads;
lambda_c 1.0, lambda_t 0.1; 2 global crops 224 px (scale 0.25-1), 8 local 96 px (0.05-0.25).
k-NN of both teachers (ViT: knn/model, CNN: knn/teacher_cnn) next to the raw-pixel floor.
runlocal: digits, 2 x 32 px + 4 x 16 px crops, ResNet resnet_mu + ViT mu/4, 256 prototypes,
search heads 64 wide with 1 block, 300 steps. ``runlocal,recipe=sinkhorn``: DINO's small-scale
recipe that does not collapse (configs/dino_pretrain.py) applied to every DINO term: Sinkhorn-Knopp
targets, teacher 0.02, the two global crops only (so no cross-attention query terms), 4,500 steps.
"""

from configs import common
from configs.dino_pretrain import multicrop_views, sinkhorn_recipe


def get_config(arg: str | None = None):
  args = common.parse_arg(
    arg, runlocal=False, cnn='resnet50', vit='S/16', cnn_checkpoint='', vit_checkpoint='',
    recipe='',
  )  # fmt: skip
  if args.recipe not in ('', 'mokd') and not (args.recipe == 'sinkhorn' and args.runlocal):
    raise ValueError(
      f"recipe={args.recipe!r}: 'mokd' (the default) or, with runlocal, 'sinkhorn' "
      '(configs/dino_pretrain.py, docs/results.md)'
    )
  c = common.base_config('mokd')
  c.objective = 'mokd'
  c.batch_size = 256
  c.num_epochs = 100.0
  c.cnn = dict(arch=args.cnn, checkpoint=args.cnn_checkpoint, dtype='float32', **common.NORM)
  c.vit = dict(
    arch=args.vit, checkpoint=args.vit_checkpoint, dtype='float32', drop_path=0.1, **common.NORM
  )
  c.mokd = dict(
    out_dim=65536, hidden_dim=2048, bottleneck_dim=256, head_layers=3, num_local=8,
    student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04,
    warmup_teacher_temp_epochs_cnn=50, warmup_teacher_temp_epochs_vit=30, center_momentum=0.9,
    centering='center', momentum=0.996, lambda_c=1.0, lambda_t=0.1, search_depth=3, search_heads=6,
    search_mlp_ratio=4,
    cnn_norm_last_layer=True,  # official code: True for the CNN, False for the ViT, whatever the
    vit_norm_last_layer=False,  # --norm_last_layer flag says
    cnn_search_schedule='vit',  # official code: CNN search head on the ViT's lr / wd schedules
  )  # fmt: skip
  c.data.views = multicrop_views(224, 96, 8, (0.25, 1.0), (0.05, 0.25))
  shared = dict(warmup_epochs=10.0, grad_clip=3.0, freeze_last_layer=1.0)
  c.optim_cnn = common.optim_config(
    name='sgd', base_lr=0.1, min_lr=0.0048, weight_decay=1e-4, weight_decay_end=1e-4,
    momentum=0.9, **shared,
  )  # fmt: skip
  c.optim_vit = common.optim_config(
    name='adamw', base_lr=3e-4, min_lr=1e-5, weight_decay=0.04, weight_decay_end=0.4, **shared
  )
  c.evaluators = dict(knn=common.knn_evaluator(raw_pixels=True))
  if args.runlocal:
    runlocal(c, args)
    if args.recipe == 'sinkhorn':
      sinkhorn_recipe(c, 'mokd')
  return c


def runlocal(c, args) -> None:
  common.runlocal_data(c)
  if args.cnn == 'resnet50':
    c.cnn.arch = 'resnet_mu'
  if args.vit == 'S/16':
    c.vit.arch = 'mu/4'
  c.vit.drop_path = 0.0
  c.mokd.update(
    out_dim=256, hidden_dim=128, bottleneck_dim=32, num_local=4, search_depth=1, search_heads=2,
    warmup_teacher_temp_epochs_cnn=5, warmup_teacher_temp_epochs_vit=3, momentum=0.99,
  )  # fmt: skip
  c.data.views = multicrop_views(32, 16, 4, (0.4, 1.0), (0.1, 0.4))
  common.digits_views(c.data.views)
  c.batch_size = 64
  c.num_train_steps = 300
  c.optim_cnn.update(base_lr=0.3, min_lr=1e-3, warmup_steps=30)
  c.optim_vit.update(base_lr=2e-3, min_lr=1e-5, warmup_steps=30)
  c.log_every = 25
  c.checkpoint_every = 100
  c.evaluators.knn.batch_size = 256
