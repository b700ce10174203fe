"""An independent PyTorch DINO (official main_dino.py semantics) on the batches of this project's
own runlocal pipeline: does the runlocal DINO recipe collapse by itself, or does our JAX code?

  python scripts/dino_torch_reference.py --steps 300                    # the runlocal recipe
  python scripts/dino_torch_reference.py --steps 200 --teacher_temp 0.01 0.02 --bn_in_head

Nothing of moma_jax's models, losses or optimizer is used (only its data, k-NN and collapse metrics): tests/torch_resnet.py's DinoViT (DINO's
initialisation, learned position embeddings resized bicubically for local crops), DINOHead,
DINOLoss and DinoTraining (main_dino.py's loop: AdamW with DINO's two parameter groups,
per-tensor clipping 3.0, the last layer frozen in epoch 1, norm_last_layer, per-step cosine lr /
weight-decay / momentum, the per-epoch teacher-temperature warm-up), which
tests/test_dino.py::test_dino_training_follows_main_dino_step_by_step matches the JAX DINO
against. Only the data come from moma_jax: the same digits crops (2 x 32 px + N x 16 px) the JAX
run trains on.
Defaults are configs/dino_pretrain.py:runlocal's (ViT mu/4, 256 prototypes, batch 64, base lr
2e-3, momentum 0.99, teacher temperature 0.04 -> 0.07 over 3 epochs).

Prints the two collapse signals every 100 steps (mean per-image entropy of the centred, sharpened
teacher output, and the entropy of its batch mean; ln K for both = every image gets the uniform
output) and the k-NN (k 20, T 0.07) of the teacher's CLS on the 720 test digits before and after;
--out writes them as JSON. About 65 s for 300 steps on 2 CPU cores (run one at a time: two torch
processes on 2 cores take 4x as long each).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]

from configs import dino_pretrain  # noqa: E402
from moma_jax.data import augment, pipeline, sources  # noqa: E402
from moma_jax.evaluators import knn  # noqa: E402
from moma_jax.objectives import dino  # noqa: E402

import torch_resnet as tr  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def to_torch(x) -> torch.Tensor:
  """uint8 [B, H, W, 3] -> ImageNet-normalised float [B, 3, H, W] (as the JAX objective does)."""
  x = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).float() / 255
  return (x - MEAN) / STD


def make_model(a) -> tr.MultiCropWrapper:
  """DINO's ViT (tests/torch_resnet.DinoViT) + DINO's head, optionally with BatchNorm."""
  backbone = tr.DinoViT(4, a.width, a.depth, a.heads, grid=8, pool=a.pool)
  head = tr.DINOHead(a.width, a.prototypes, 3, a.hidden, a.bottleneck)
  if a.bn_in_head:  # DINO's --use_bn_in_head
    h = a.hidden
    head.mlp = nn.Sequential(
      nn.Linear(a.width, h), nn.BatchNorm1d(h), nn.GELU(), nn.Linear(h, h), nn.BatchNorm1d(h),
      nn.GELU(), nn.Linear(h, a.bottleneck),
    )  # fmt: skip
  for m in head.mlp:  # DINOHead._init_weights
    if isinstance(m, nn.Linear):
      nn.init.trunc_normal_(m.weight, std=0.02)
      nn.init.zeros_(m.bias)
  return tr.MultiCropWrapper(backbone, head)


def knn_top1(model: tr.MultiCropWrapper, data: dict) -> tuple[float, float]:
  """(k-NN top-1 of the backbone's feature, by the trainer's knn_predict; mean cosine between
  test images)."""
  with torch.no_grad():
    tr_x, te_x = (F.normalize(model.backbone(data[s][0]), dim=-1).numpy()
                  for s in ('train', 'test'))  # fmt: skip
  tr_y, te_y = data['train'][1], data['test'][1]
  scores = knn.knn_predict(tr_x, tr_y, te_x, num_classes=int(tr_y.max()) + 1)
  cos = te_x @ te_x.T
  n = len(cos)
  return float((scores.argmax(1) == te_y).mean()), float((cos.sum() - n) / (n * (n - 1)))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--num_local', type=int, default=4)
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument('--width', type=int, default=64)
  p.add_argument('--depth', type=int, default=2)
  p.add_argument('--heads', type=int, default=2)
  p.add_argument('--pool', choices=('cls', 'mean'), default='cls')
  p.add_argument('--prototypes', type=int, default=256)
  p.add_argument('--hidden', type=int, default=128)
  p.add_argument('--bottleneck', type=int, default=32)
  p.add_argument('--bn_in_head', action='store_true')
  p.add_argument('--base_lr', type=float, default=2e-3, help='per 256 images')
  p.add_argument('--momentum', type=float, default=0.99)
  p.add_argument('--teacher_temp', type=float, nargs=2, default=(0.04, 0.07))
  p.add_argument('--teacher_temp_epochs', type=int, default=3)
  p.add_argument('--student_temp', type=float, default=0.1)
  p.add_argument('--center_momentum', type=float, default=0.9)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default='')
  a = p.parse_args()
  torch.manual_seed(a.seed)

  c = dino_pretrain.get_config('runlocal')
  views = pipeline.views_from_config(c.data.views)
  names = ['global1', 'global2'] + [f'local{i + 1}' for i in range(a.num_local)]
  views = {k: views[k] for k in names}
  src = sources.open_split(c.data.name, c.data.train_split)
  steps_per_epoch = src.total_examples // a.batch_size
  batches = pipeline.train_iterator(src, views, batch_size=a.batch_size, seed=a.seed)
  ev = {'image': augment.ViewSpec(size=32, crop='center', resize_ratio=1.0)}
  data = {}
  for split in ('train', 'test'):
    xs, ys = [], []
    for b in pipeline.eval_iterator(sources.open_split(c.data.name, split), ev, batch_size=256):
      m = np.asarray(b['mask'])
      xs.append(to_torch(b['image'])[torch.from_numpy(m)])
      ys.append(np.asarray(b['label'])[m])
    data[split] = (torch.cat(xs), np.concatenate(ys))

  student, teacher = make_model(a), make_model(a)
  epochs = math.ceil(a.steps / steps_per_epoch) + a.teacher_temp_epochs
  loss_fn = tr.DINOLoss(a.prototypes, len(names), *a.teacher_temp, a.teacher_temp_epochs, epochs,
                        student_temp=a.student_temp, center_momentum=a.center_momentum)  # fmt: skip
  run = tr.DinoTraining(
    student, teacher, loss_fn, tr.cosine_scheduler(a.base_lr * a.batch_size / 256, 1e-5, a.steps, 30),
    tr.cosine_scheduler(0.04, 0.4, a.steps), tr.cosine_scheduler(a.momentum, 1.0, a.steps),
    steps_per_epoch,
  )  # fmt: skip

  before = knn_top1(teacher, data)
  print(f'init: k-NN {before[0]:.3f}, mean cosine between test images {before[1]:.4f}', flush=True)
  history, t0 = [], time.time()
  for step in range(a.steps):
    crops = [to_torch(x) for x in map(next(batches).__getitem__, names)]
    center, temp = loss_fn.center.clone(), loss_fn.teacher_temp_schedule[step // steps_per_epoch]
    loss, t_out = run.step(step, crops)
    signals = dino.collapse_metrics(t_out.numpy(), center.numpy(), temp)  # what the JAX run logs
    ent, batch_ent = (float(signals[k]) for k in ('teacher_entropy', 'teacher_batch_entropy'))
    history.append((step, loss, ent, batch_ent))
    if step % 100 == 0 or step == a.steps - 1:
      print(f'step {step}: loss {loss:.3f}, teacher entropy {ent:.3f}, batch entropy '
            f'{batch_ent:.3f} (ln K {math.log(a.prototypes):.3f}; {time.time() - t0:.0f} s)',
            flush=True)  # fmt: skip
  after = knn_top1(teacher, data)
  print(f'after: k-NN {after[0]:.3f}, mean cosine between test images {after[1]:.4f}')
  if a.out:
    with open(a.out, 'w') as f:
      json.dump({'args': vars(a), 'before': before, 'after': after, 'history': history}, f)


if __name__ == '__main__':
  main()
