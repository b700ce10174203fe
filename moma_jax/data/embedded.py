"""'digits-m': an MNIST-M-style dataset built offline from data that ships with the pinned packages.

scikit-learn's 8x8 digits are upscaled, placed at a random position and blended (MNIST-M's
|background - digit|) over random crops of the photos bundled with scikit-image and
scikit-learn, with a random digit colour. Raw-pixel k-NN on plain digits is ~98%; here it is far
below the ceiling (~35%, see README) while a 2-block ViT trained from scratch for 600 steps
reaches ~45%: hard for pixels, learnable for features. Built deterministically in about
a second and cached in memory; no download.
"""

from __future__ import annotations

import functools

import numpy as np

IMAGE_SIZE = 32
NUM_CLASSES = 10
TRAIN_RENDERS = 4  # renders of each training digit (different background, colour, place)
TEST_RENDERS = 2
_COLOUR_PHOTOS = (
  'astronaut',
  'chelsea',
  'coffee',
  'rocket',
  'hubble_deep_field',
  'immunohistochemistry',
  'retina',
  'colorwheel',
)
_GRAY_PHOTOS = ('camera', 'grass', 'gravel', 'brick', 'moon', 'coins', 'page', 'text')


def _photos() -> list[np.ndarray]:
  import skimage.data
  from sklearn.datasets import load_sample_images

  photos = [getattr(skimage.data, n)()[..., :3] for n in _COLOUR_PHOTOS]
  photos += [np.repeat(getattr(skimage.data, n)()[..., None], 3, axis=-1) for n in _GRAY_PHOTOS]
  photos += list(load_sample_images().images)
  return [p.astype(np.uint8) for p in photos]


def _render(digit: np.ndarray, photo: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
  from PIL import Image

  s = IMAGE_SIZE
  # Background: a random square crop (32 to 160 px) of the photo, resized to 32x32, random tint.
  h, w = photo.shape[:2]
  c = rng.randint(s, min(h, w, 5 * s) + 1)
  y, x = rng.randint(h - c + 1), rng.randint(w - c + 1)
  bg = Image.fromarray(photo[y : y + c, x : x + c]).resize((s, s), Image.BILINEAR)
  bg = np.asarray(bg, np.float32) * rng.uniform(0.5, 0.9, size=3)
  # Digit: 8x8 (values 0..16) upscaled to 18..28 px at a random position, random bright colour.
  d = rng.randint(18, 29)
  glyph = Image.fromarray((digit * (255.0 / 16.0)).astype(np.uint8)).resize((d, d), Image.BICUBIC)
  mask = np.zeros((s, s), np.float32)
  oy, ox = rng.randint(s - d + 1), rng.randint(s - d + 1)
  mask[oy : oy + d, ox : ox + d] = np.asarray(glyph, np.float32) / 255.0
  colour = rng.uniform(170, 255, size=3)
  out = np.abs(bg - mask[..., None] * colour)
  return np.clip(out, 0, 255).astype(np.uint8)


@functools.cache
def load(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images [N, 32, 32, 3] uint8, labels [N] int32) for split 'train' or 'test'.

  train: 1437 digits x 4 renders = 5748 images; test: the other 360 digits x 2 = 720 images.
  The digits themselves never cross the split.
  """
  if split not in ('train', 'test'):
    raise ValueError(f"digits-m has splits 'train' and 'test', not {split!r}")
  from sklearn.datasets import load_digits

  digits = load_digits()
  order = np.random.RandomState(0).permutation(len(digits.target))
  n_test = 360
  idx = order[n_test:] if split == 'train' else order[:n_test]
  renders = TRAIN_RENDERS if split == 'train' else TEST_RENDERS
  rng = np.random.RandomState(1 if split == 'train' else 2)
  photos = _photos()
  images, labels = [], []
  for _ in range(renders):
    for i in idx:
      photo = photos[rng.randint(len(photos))]
      images.append(_render(digits.images[i], photo, rng))
      labels.append(digits.target[i])
  images_arr = np.stack(images)
  images_arr.flags.writeable = False
  return images_arr, np.asarray(labels, np.int32)
