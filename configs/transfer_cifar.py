r"""Transfer: fine-tune on CIFAR-10 / CIFAR-100 at 224 px (the ViT transfer recipe).

  python main.py --config=configs/transfer_cifar.py:dataset=cifar10,checkpoint=DIR --workdir=$WD \
    --config.data.data_dir=DIR_WITH_TFDS_CIFAR   # prepare once: tfds build cifar10 --data_dir=...
  python main.py --config=configs/transfer_cifar.py:dataset=cifar100,checkpoint=DIR --workdir=$WD

ViT recipe: SGD momentum 0.9, lr 0.03 at batch 512 (blr 0.015), no weight decay, global-norm clip
1.0, cosine, 500 warm-up steps, 10k steps (CIFAR-10) / 20k (CIFAR-100), no mixup; images
resized from 32 to 224 px (random resized crop + flip; centre crop for evaluation).
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, runlocal=False, checkpoint='', dataset='cifar10')
  if args.dataset not in ('cifar10', 'cifar100'):
    raise ValueError(f"dataset={args.dataset!r}; one of 'cifar10', 'cifar100'")
  c = common.classification_config(f'transfer_{args.dataset}', args)
  c.data.update(name=args.dataset, train_split='train', eval_split='test', eval_resize_ratio=1.0)
  c.classifier.update(
    pool='cls', drop_path=0.0, label_smoothing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0,
    erase_prob=0.0,
  )  # fmt: skip
  common.set_views(c, image=dict(scale=(0.08, 1.0)))
  c.batch_size = 512
  c.num_train_steps = 10_000 if args.dataset == 'cifar10' else 20_000
  c.optim = common.optim_config(
    name='sgd', base_lr=0.03 * 256 / 512, weight_decay=0.0, warmup_steps=500, grad_clip=1.0
  )
  if args.runlocal:
    common.runlocal_classification(c)
  return c
