r"""DINO pre-training (self-distillation, multi-crop) of a ViT or a ResNet; an EMA teacher,
centering and sharpening, DINO head with 65536 prototypes. k-NN on the teacher's features.

  python main.py --config=configs/dino_pretrain.py:runlocal --workdir=/tmp/dino
  python main.py --config=configs/dino_pretrain.py:runlocal,arch=resnet_mu --workdir=/tmp/dino_r
  python main.py --config=configs/dino_pretrain.py:arch=S/16 --workdir=$WD --config.data.data_dir=$TFDS
  python main.py --config=configs/dino_pretrain.py:arch=resnet50 --workdir=$WD --config.data.data_dir=$TFDS

Recipe (official main_dino.py; ViT-S/16, the README's full run): AdamW, lr 5e-4 x batch / 256 with
10 warm-up epochs, cosine to 1e-6, weight decay 0.04 -> 0.4 (cosine), batch 1024, 100 epochs,
per-tensor gradient clipping 3.0, last layer frozen in epoch 1, drop path 0.1, momentum
0.996 -> 1, teacher temperature 0.04 -> 0.07 over 30 epochs (main_dino.py's argparse default is a
constant 0.04), student 0.1, center momentum 0.9; 2 global crops 224 px (scale 0.4-1, blur 1.0 /
0.1, solarise 0 / 0.2) and 8 local crops 96 px (scale 0.05-0.4, blur 0.5), colour jitter
(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, flip. ResNet-50 (arch=resnet50): SGD lr 0.03,
weight decay 1e-4 constant, global crops scale 0.14-1, local 0.05-0.14 (DINO README).
runlocal: 2 x 32 px + 4 x 16 px crops of digits, a tiny ViT (mu/4) or ResNet (resnet_mu),
256 prototypes, 300 steps (ViT about 3 min, ResNet about 6 min on 2 CPU cores). Its teacher
collapses to the uniform output within ~100-200 steps, as an independent PyTorch DINO does on
these digits (docs/results.md). ``runlocal,recipe=sinkhorn`` is the small-scale recipe that does
not collapse and learns (ViT): DINOv2's Sinkhorn-Knopp centering, teacher temperature 0.02, the
two global crops only, 4,500 steps (about 18 min on 2 CPU cores):

  python main.py --config=configs/dino_pretrain.py:runlocal,recipe=sinkhorn --workdir=/tmp/dino_sk
"""

from configs import common


def multicrop_views(
  global_size: int, local_size: int, num_local: int, global_scale=(0.4, 1.0),
  local_scale=(0.05, 0.4),
) -> dict:  # fmt: skip
  """DINO's DataAugmentationDINO as named views: 'global1', 'global2', 'local1' ... 'localN'."""
  strong = dict(jitter_prob=0.8, grayscale_prob=0.2)
  views = {
    'global1': dict(size=global_size, scale=global_scale, **strong, blur_prob=1.0),
    'global2': dict(size=global_size, scale=global_scale, **strong, blur_prob=0.1,
                    solarize_prob=0.2),
  }  # fmt: skip
  for i in range(num_local):
    views[f'local{i + 1}'] = dict(size=local_size, scale=local_scale, **strong, blur_prob=0.5)
  return views


def dino_settings(**overrides):
  d = dict(
    out_dim=65536, hidden_dim=2048, bottleneck_dim=256, head_layers=3, norm_last_layer=True,
    num_local=8, student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04,
    warmup_teacher_temp_epochs=30, center_momentum=0.9, momentum=0.996, centering='center',
  )  # fmt: skip
  d.update(overrides)
  return d


def dino_optim(**overrides):
  """DINO's optimizer settings (see objectives/dino.py: dino_optimizer)."""
  return common.optim_config(
    **dict(name='adamw', base_lr=5e-4, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4,
           warmup_epochs=10.0, grad_clip=3.0, freeze_last_layer=1.0, b2=0.999),
    **overrides,
  )  # fmt: skip


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, runlocal=False, arch='S/16', checkpoint='', recipe='')
  if args.recipe not in ('', 'dino') and not (args.recipe == 'sinkhorn' and args.runlocal):
    raise ValueError(
      f"recipe={args.recipe!r}: 'dino' (the default) or, with runlocal, 'sinkhorn' (docs/results.md)"
    )
  c = common.base_config('dino_pretrain')
  c.objective = 'dino'
  c.batch_size = 1024
  c.num_epochs = 100.0
  resnet = args.arch.startswith('resnet')
  c.model = dict(
    arch=args.arch, checkpoint=args.checkpoint, dtype='float32',
    drop_path=0.0 if resnet else 0.1, **common.NORM,
  )  # fmt: skip
  c.dino = dino_settings()
  scales = ((0.14, 1.0), (0.05, 0.14)) if resnet else ((0.4, 1.0), (0.05, 0.4))
  c.data.views = multicrop_views(224, 96, 8, *scales)
  c.optim = dino_optim()
  if resnet:
    c.optim.update(name='sgd', base_lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4)
  c.evaluators = dict(knn=common.knn_evaluator(raw_pixels=True))
  if args.runlocal:
    runlocal(c, args.arch if args.arch != 'S/16' else 'mu/4')
    if args.recipe == 'sinkhorn':
      sinkhorn_recipe(c)
  return c


def runlocal(c, arch: str) -> None:
  """digits at 32 px: 2 global crops of 32 px, 4 local crops of 16 px; tiny heads."""
  common.runlocal_data(c)
  c.model.arch = arch
  c.model.drop_path = 0.0
  c.dino.update(
    out_dim=256, hidden_dim=128, bottleneck_dim=32, num_local=4, warmup_teacher_temp_epochs=3,
    momentum=0.99,
  )  # fmt: skip
  scales = ((0.4, 1.0), (0.1, 0.4))
  c.data.views = multicrop_views(32, 16, 4, *scales)
  common.digits_views(c.data.views)
  c.batch_size = 64
  c.num_train_steps = 300
  # The same optimizers as the two models of configs/mokd.py:runlocal (DINO alone vs MOKD).
  if c.optim.name == 'adamw':
    c.optim.update(base_lr=2e-3, min_lr=1e-5, warmup_steps=30)
  else:
    c.optim.update(base_lr=0.3, min_lr=1e-3, warmup_steps=30)
    c.dino.warmup_teacher_temp_epochs = 5
  c.log_every = 25
  c.checkpoint_every = 100
  c.evaluators.knn.batch_size = 256


def sinkhorn_recipe(c, section: str = 'dino') -> None:
  """The runlocal recipe whose teacher does not collapse on digits (issue 32, docs/results.md):
  DINOv2's Sinkhorn-Knopp targets instead of the EMA center, a sharper teacher (0.02 constant),
  no local crops (a 16 px crop of a 32 px digit is mostly background), 15x the budget.
  ``section``: 'dino', or 'mokd' (configs/mokd.py, both models' DINO terms). A ResNet is trained
  by the ViT's AdamW (runlocal lr, weight decay 0.04 -> 0.4): with DINO's SGD its teacher gives
  every image the uniform output within 50 steps even under Sinkhorn-Knopp (docs/results.md)."""
  s = c[section]
  s.update(centering='sinkhorn', teacher_temp=0.02, warmup_teacher_temp=0.02, num_local=0)
  for name in ('optim', 'optim_cnn'):
    if name in c and c[name].name == 'sgd':
      c[name].update(
        name='adamw', base_lr=2e-3, min_lr=1e-5, weight_decay=0.04, weight_decay_end=0.4, b2=0.999
      )
  c.data.views = {k: v for k, v in c.data.views.items() if k.startswith('global')}
  c.num_train_steps = 4500
  c.log_every = 250
  c.checkpoint_every = 1500
