"""Training-stream throughput on full-size JPEGs, through the real ImageNet path.

fake_imagenet writes ILSVRC2012_img_{train,val}.tar with 500 x 375 JPEGs (quality 90, detail
set so files average ~110 KB like ImageNet's); the real tfds ``imagenet2012`` builder prepares
them as ArrayRecord; ``pipeline.train_iterator`` streams them in global-shuffle order (random
access), decoding only each crop window. MOMA's views are taken from configs/moco_to_mae.py
('teacher' + 'strong' sharing its crop, 224 px); the others give scale.

Rates: images per wall-clock second, and per CPU second of this process (user + system over all
its threads: images/s per core, which stays meaningful on a machine shared with other work).
Settings with photometric augmentations run twice: 'host' (tf.data applies them) and 'device'
(the host makes the crops and the per-example seeds; the train step applies them on the
accelerator, moma_jax/data/photometric.py: data.photometric='auto' on GPU / TPU).

  python benchmarks/input_pipeline.py [--images 1024] [--threads 1 2] [--seconds 10]
  python benchmarks/input_pipeline.py --profile   # where the time of MOMA's views goes
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import moco_to_mae  # noqa: E402
from moma_jax.data import augment, fake_imagenet, pipeline, sources  # noqa: E402
from moma_jax.data.augment import ViewSpec  # noqa: E402

SETTINGS = {
  'MOMA (moco_to_mae): teacher + strong': pipeline.views_from_config(
    moco_to_mae.get_config().data.views
  ),
  'crop + flip': {'v': ViewSpec(size=224)},
  'MoCo v3: two strong views': {
    'v1': augment.moco_strong_view(224, blur_prob=1.0, solarize_prob=0.0),
    'v2': augment.moco_strong_view(224, blur_prob=0.1, solarize_prob=0.2),
  },
  'fine-tune: crop + flip + RandAugment': {'v': ViewSpec(size=224, randaugment=(2, 9.0))},
}


def prepare(root: str, images: int, noise: int = 40) -> sources.HostSplit:
  classes = 8
  manual = fake_imagenet.write_manual_dir(
    f'{root}/manual', num_classes=classes, images_per_class=images // classes, num_val=8,
    noise=noise,
  )  # fmt: skip
  return sources.open_split(
    'imagenet2012', 'train', data_dir=f'{root}/tfds', manual_dir=manual, process_index=0,
    process_count=1,
  )  # fmt: skip


def measure(
  src, views, threads: int, batch: int, seconds: float, device_photometric: bool = False
) -> tuple[float, float]:
  """(images per wall second, images per CPU second) after a warm-up."""
  it = pipeline.train_iterator(
    src, views, batch_size=batch, seed=0, threads=threads, device_photometric=device_photometric
  )
  for _ in range(3):
    next(it)
  n, t0, c0 = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += batch
  return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def profile(src, seconds: float) -> None:
  """CPU ms per image of MOMA's views built up stage by stage (1 thread), to see where time goes."""
  moma = SETTINGS['MOMA (moco_to_mae): teacher + strong']
  teacher, strong = moma['teacher'], moma['strong']
  plain = dataclasses.replace(strong, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
  stages = {
    'teacher view: decode the crop window, resize, flip': {'teacher': teacher},
    '+ strong view sharing the crop, no photometric ops': {'teacher': teacher, 'strong': plain},
    '+ strong view with blur only (p 1.0)': {
      'teacher': teacher,
      'strong': dataclasses.replace(plain, blur_prob=1.0),
    },
    '+ strong view with colour jitter only (p 0.8)': {
      'teacher': teacher,
      'strong': dataclasses.replace(plain, jitter_prob=0.8),
    },
    'MOMA: teacher + strong (jitter, grayscale, blur)': {'teacher': teacher, 'strong': strong},
  }
  print('| stage (1 thread) | CPU ms per image |')
  print('|---|---|')
  for name, views in stages.items():
    _, cpu = measure(src, views, 1, 64, seconds)
    print(f'| {name} | {1e3 / cpu:.2f} |', flush=True)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--images', type=int, default=1024)
  p.add_argument('--threads', type=int, nargs='+', default=[1, 2])
  p.add_argument('--seconds', type=float, default=10.0)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--only', default='', help='run only the settings whose name contains this')
  p.add_argument('--noise', type=int, default=40, help='JPEG detail: 40 ~110 KB, 12 ~60 KB')
  p.add_argument('--profile', action='store_true', help="MOMA's views stage by stage instead")
  a = p.parse_args()
  import tensorflow as tf
  import tensorflow_datasets as tfds

  with tempfile.TemporaryDirectory() as root:
    src = prepare(root, a.images, a.noise)
    size = (
      sum(f.stat().st_size for f in pathlib.Path(root, 'manual').iterdir()) / src.total_examples
    )
    print(
      f'{src.total_examples} JPEGs (~{size / 1e3:.0f} KB each with the val set and tar headers), '
      f'{os.cpu_count()} cores, Python {platform.python_version()}, TensorFlow {tf.__version__}, '
      f'tfds {tfds.__version__}'
    )
    if a.profile:
      profile(src, a.seconds)
      return
    print(
      '| pipeline | photometric ops | threads | images/s | images/s per thread '
      '| images/s per CPU second |'
    )
    print('|---|---|---|---|---|---|')
    for name, views in SETTINGS.items():
      if a.only not in name:
        continue
      strong = any(v.strong for v in views.values())
      for where in ('host', 'device') if strong else ('-',):
        for t in a.threads:
          wall, cpu = measure(src, views, t, a.batch, a.seconds, where == 'device')
          print(f'| {name} | {where} | {t} | {wall:.0f} | {wall / t:.0f} | {cpu:.0f} |', flush=True)


if __name__ == '__main__':
  main()
