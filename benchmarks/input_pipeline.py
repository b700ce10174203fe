"""Training-pipeline throughput on real JPEG files of ImageNet-like size (500 x 375).

The files are random crops of the photos bundled with scikit-image / scikit-learn, resized to
500 x 375 and saved as JPEG quality 90 (about ImageNet's typical size and compression), in an
image folder read through the same source and pipeline as training.

  python benchmarks/input_pipeline.py [--images 512] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from moma_jax.data import augment, pipeline, sources
from moma_jax.data.augment import ViewSpec


def write_jpegs(root: str, n: int) -> None:
  from moma_jax.data.embedded import _photos

  photos = [p for p in _photos() if min(p.shape[:2]) >= 300]
  rng = np.random.RandomState(0)
  for c in range(10):
    os.makedirs(os.path.join(root, f'class{c}'), exist_ok=True)
  for i in range(n):
    p = photos[rng.randint(len(photos))]
    h, w = p.shape[:2]
    ch = rng.randint(h // 2, h + 1)
    cw = min(w, int(ch * 4 / 3))
    y, x = rng.randint(h - ch + 1), rng.randint(w - cw + 1)
    img = Image.fromarray(p[y : y + ch, x : x + cw]).resize((500, 375), Image.BICUBIC)
    img.save(os.path.join(root, f'class{i % 10}', f'{i}.jpg'), quality=90)


SETTINGS = {
  'crop+flip (224)': {'v': ViewSpec(size=224)},
  'MOMA: teacher + student sharing the crop, strong student': {
    'teacher': ViewSpec(size=224),
    'student': ViewSpec(
      size=224,
      share_crop_with='teacher',
      jitter_prob=0.8,
      grayscale_prob=0.2,
      blur_prob=1.0,
      solarize_prob=0.0,
    ),
  },
  'MoCo v3: two strong views': {
    'v1': augment.moco_strong_view(224, blur_prob=1.0, solarize_prob=0.0),
    'v2': augment.moco_strong_view(224, blur_prob=0.1, solarize_prob=0.2),
  },
  'fine-tune: crop+flip+RandAugment': {'v': ViewSpec(size=224, randaugment=(2, 9.0))},
}


def measure(src, views, threads: int, batch: int = 64, seconds: float = 8.0) -> float:
  it = pipeline.train_iterator(src, views, batch_size=batch, seed=0, threads=threads)
  for _ in range(3):
    next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += batch
  return n / (time.perf_counter() - t0)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--images', type=int, default=512)
  p.add_argument('--threads', type=int, nargs='+', default=[1, 2])
  p.add_argument('--seconds', type=float, default=8.0)
  a = p.parse_args()
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, a.images)
    src = sources.open_split(f'folder:{root}', 'train', process_index=0, process_count=1)
    print('| pipeline | threads | images/s | images/s per thread |')
    print('|---|---|---|---|')
    for name, views in SETTINGS.items():
      for t in a.threads:
        ips = measure(src, views, t, seconds=a.seconds)
        print(f'| {name} | {t} | {ips:.0f} | {ips / t:.0f} |', flush=True)


if __name__ == '__main__':
  main()
