"""k-NN and linear-probe top-1 of exported PyTorch ViTs on the embedded digits, by code that is not
moma_jax's evaluator: a check that a result printed by the trainer is not an artefact of it.

The checkpoint (an MAE-format ``model.pth`` or a MoCo v3 ``.pth.tar``, e.g. ``WORKDIR/export/model.pth`` or a shipped
teacher) is read by the tests' independent timm-style PyTorch ViT (tests/torch_reference.py),
features are [CLS, mean of the patch tokens] after the final norm (as moma_jax's evaluator, so the
two can be compared number for number), k-NN is scikit-learn's (k 20, cosine distance, DINO's
exp(similarity / 0.07) votes) and the linear probe scikit-learn's logistic regression (C = 1) on
standardised features. Only the images come from moma_jax (``embedded.load``): they are the dataset.

  python scripts/outside_eval.py teachers/mae_mu4_digits.pth /tmp/moma_runlocal/export/model.pth
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

K, TEMPERATURE = 20, 0.07


def load_vit(path: str):
  """The encoder of an MAE-format ({'model': state_dict}) or MoCo v3-format ({'state_dict':
  {'module.base_encoder.*'}}) checkpoint as tests.torch_reference.VisionTransformer; the head count
  is read from the {'moma_jax': {'num_heads': H}} entry moma_jax's exports carry."""
  import torch

  from tests import torch_reference

  ckpt = torch.load(path, map_location='cpu', weights_only=False)
  if 'state_dict' in ckpt:  # MoCo v3: the momentum-free base encoder, without its projector
    prefix = 'module.base_encoder.'
    state = {k[len(prefix) :]: v for k, v in ckpt['state_dict'].items() if k.startswith(prefix)}
  else:
    state = ckpt['model']
  heads = ckpt.get('moma_jax', {}).get('num_heads')
  if heads is None:
    raise ValueError(
      f'{path}: no moma_jax.num_heads entry; export it with moma_jax (main.py or convert)'
    )
  dim = state['cls_token'].shape[-1]
  patch = state['patch_embed.proj.weight'].shape[-1]
  depth = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
  side = int(round((state['pos_embed'].shape[1] - 1) ** 0.5)) * patch
  model = torch_reference.VisionTransformer(
    img_size=side, patch=patch, dim=dim, depth=depth, heads=heads
  )
  encoder = {k: v for k, v in state.items() if not k.startswith(('decoder', 'mask_token', 'head'))}
  model.load_state_dict(encoder)
  return model.eval()


def features(model, images: np.ndarray, batch: int = 512) -> np.ndarray:
  """[CLS, mean of the patch tokens] after the final norm, on ImageNet-normalised images."""
  import torch

  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  out = []
  with torch.no_grad():
    for i in range(0, len(images), batch):
      x = (images[i : i + batch].astype(np.float32) / 255.0 - mean) / std
      tokens, _ = model.forward_encoder(torch.from_numpy(x).permute(0, 3, 1, 2))
      out.append(torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1).numpy())
  return np.concatenate(out)


def probes(train_x, train_y, test_x, test_y) -> tuple[float, float]:
  """(k-NN top-1, linear-probe top-1) in %, both scikit-learn."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.neighbors import KNeighborsClassifier
  from sklearn.preprocessing import StandardScaler

  # Cosine distance d = 1 - similarity, so DINO's vote weight exp(sim / T) is exp((1 - d) / T).
  knn = KNeighborsClassifier(K, metric='cosine', weights=lambda d: np.exp((1 - d) / TEMPERATURE))
  knn_top1 = (knn.fit(train_x, train_y).predict(test_x) == test_y).mean()
  scaler = StandardScaler().fit(train_x)
  linear = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(train_x), train_y)
  linear_top1 = (linear.predict(scaler.transform(test_x)) == test_y).mean()
  return 100 * float(knn_top1), 100 * float(linear_top1)


def evaluate(path: str, dataset: str = 'digits') -> tuple[float, float]:
  from moma_jax.data import embedded

  model = load_vit(path)
  (train_images, train_y), (test_images, test_y) = (
    embedded.load('train', dataset),
    embedded.load('test', dataset),
  )
  return probes(features(model, train_images), train_y, features(model, test_images), test_y)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
    'checkpoints', nargs='+', help='MAE- or MoCo v3-format checkpoints written by moma_jax'
  )
  parser.add_argument('--dataset', default='digits', help='an embedded dataset (default: digits)')
  args = parser.parse_args(argv)
  for path in args.checkpoints:
    if not os.path.isfile(path):
      parser.error(f'{path}: no such file; pass WORKDIR/export/model.pth or a teachers/*.pth')
  print(f'{"checkpoint":<60} {"k-NN":>7} {"linear":>7}')
  for path in args.checkpoints:
    knn, linear = evaluate(path, args.dataset)
    print(f'{path:<60} {knn:6.1f}% {linear:6.1f}%')
  return 0


if __name__ == '__main__':
  sys.exit(main())
