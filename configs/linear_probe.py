r"""Linear probe: frozen encoder, BatchNorm (no affine) + linear head on the CLS token (MAE recipe).

  python main.py --config=configs/linear_probe.py:runlocal,checkpoint=DIR --workdir=/tmp/lp
  python main.py --config=configs/linear_probe.py:checkpoint=WORKDIR/export/model --workdir=$WD
  python main.py --config=configs/linear_probe.py:checkpoint=DIR,optimizer=sgd --workdir=$WD

MAE: LARS (momentum 0.9), blr 0.1, wd 0, batch 16384, 90 epochs, 10 warm-up, random resized crop +
flip. optimizer=sgd: SGD momentum 0.9, blr 0.1 (scaled by batch / 256 as everywhere), wd 0 (MoCo
v3's probe uses SGD). The encoder's parameters are never updated (bit-identical after training).
runlocal uses SGD: LARS's trust ratio makes it too slow for a few hundred steps.
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, runlocal=False, checkpoint='', optimizer='lars', pool='cls')
  c = common.classification_config('linear_probe', args)
  c.classifier.update(
    linear_probe=True, pool=args.pool, drop_path=0.0, label_smoothing=0.0, mixup_alpha=0.0,
    cutmix_alpha=0.0, erase_prob=0.0,
  )  # fmt: skip
  c.batch_size = 16384
  c.num_epochs = 90.0
  c.optim = common.optim_config(
    name=args.optimizer, base_lr=0.1, weight_decay=0.0, warmup_epochs=10.0
  )
  common.set_views(c, image=dict(scale=(0.08, 1.0)))
  if args.runlocal:
    common.runlocal_classification(c)
    # LARS (trust ratio 0.001) is built for ~7k steps at lr 6.4: in a few hundred steps it barely
    # moves the head, so runlocal probes with SGD.
    c.optim.update(name='sgd', base_lr=0.5)
  return c
