"""The embedded offline datasets, built from data that ships with the pinned packages (no download).

'digits' (the runlocal default): scikit-learn's 8x8 digits upscaled to 18-28 px, rotated up to
+-15 degrees, placed within +-4 px of the centre, white on a black background with Gaussian pixel
noise. Chosen for issue 17 by measurement (docs/results.md): raw pixels are a strong k-NN baseline on
digits (88%) but a weak linear one (37%: the random positions); a randomly initialised ViT mu/4
gets 31-34% k-NN / 60-64% linear on [CLS, mean] features; 1,000 steps of MoCo v3 or MAE on 2 CPU cores
learn features well above random init. Digits on per-image backgrounds (digits_m) or in random
colours were rejected: self-supervision at this budget learns the background or the colour.

'digits_m' (the earlier default, kept so its results can be reproduced): an MNIST-M-style variant,
the upscaled digits blended (MNIST-M's |background - digit|) over random crops of the photos bundled
with scikit-image and scikit-learn, in a random colour. Its photo backgrounds identify each image:
MoCo v3 learns them instead of the digit (issue 17's note).

Both: 1,437 training digits x 4 renders = 5,748 train images, the other 360 digits x 2 = 720 test
images (the digits themselves never cross the split), 32x32 RGB uint8, 10 classes; built
deterministically (2.5 s on 2 cores) and cached in memory and on disk: in $MOMA_JAX_CACHE (default
~/.cache/moma_jax; empty: no disk cache), one file per dataset and split, named by a hash of this
module and of the versions of the libraries that draw the images, so a change to either renders
anew.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os

import numpy as np

from moma_jax import storage

NAMES = ('digits', 'digits_m')
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


def _render_m(digit: np.ndarray, photo: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
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


def _render(digit: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
  """'digits': white digit, random size / rotation / position near the centre, noisy black."""
  from PIL import Image

  s = IMAGE_SIZE
  d = rng.randint(18, 29)
  glyph = Image.fromarray((digit * (255.0 / 16.0)).astype(np.uint8)).resize((d, d), Image.BICUBIC)
  glyph = glyph.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC)
  mask = np.zeros((s, s), np.float32)
  c = (s - d) // 2
  oy, ox = (int(np.clip(c + rng.randint(-4, 5), 0, s - d)) for _ in range(2))
  mask[oy : oy + d, ox : ox + d] = np.asarray(glyph, np.float32) / 255.0
  out = 20.0 + 210.0 * mask[..., None] + rng.normal(0, 8, size=(s, s, 3))
  return np.clip(out, 0, 255).astype(np.uint8)


@functools.cache
def load(split: str, name: str = 'digits') -> tuple[np.ndarray, np.ndarray]:
  """Returns (images [N, 32, 32, 3] uint8, labels [N] int32) of dataset ``name`` (one of NAMES),
  split 'train' (5,748 images) or 'test' (720); the digits themselves never cross the split."""
  if name not in NAMES:
    raise ValueError(f'no embedded dataset {name!r}; there are {", ".join(NAMES)}')
  if split not in ('train', 'test'):
    raise ValueError(f"{name} has splits 'train' and 'test', not {split!r}")
  path = _cache_path(split, name)
  if path and os.path.exists(path):
    try:
      with np.load(path) as f:
        images, labels = f['images'], f['labels']
      images.flags.writeable = False
      return images, labels
    except (OSError, KeyError, ValueError):  # a damaged file: render again and replace it
      pass
  images, labels = render(split, name)
  if path:
    try:  # whole or not at all (storage.local_output): concurrent readers see no half file
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with storage.local_output(path) as tmp, open(tmp, 'wb') as f:
        np.savez(f, images=images, labels=labels)
    except OSError:  # a read-only or full disk: the cache is only for speed
      pass
  return images, labels


def _cache_path(split: str, name: str) -> str | None:
  default = os.path.join(os.path.expanduser('~'), '.cache', 'moma_jax')
  root = os.environ.get('MOMA_JAX_CACHE', default)
  if not root:
    return None
  with open(__file__, 'rb') as f:
    key = hashlib.sha256(f.read())
  # The installed versions, read without importing (scikit-learn's import alone takes 1.6 s).
  for dist in ('numpy', 'pillow', 'scikit-learn', 'scikit-image'):
    key.update(f'{dist} {importlib.metadata.version(dist)};'.encode())
  return os.path.join(root, f'embedded-{name}-{split}-{key.hexdigest()[:16]}.npz')


def render(split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
  """:func:`load`'s images and labels, drawn anew (no cache)."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  order = np.random.RandomState(0).permutation(len(digits.target))
  n_test = 360
  idx = order[n_test:] if split == 'train' else order[:n_test]
  renders = TRAIN_RENDERS if split == 'train' else TEST_RENDERS
  rng = np.random.RandomState(1 if split == 'train' else 2)
  if name == 'digits_m':
    photos = _photos()
    draw = lambda digit: _render_m(digit, photos[rng.randint(len(photos))], rng)  # noqa: E731
  else:
    draw = lambda digit: _render(digit, rng)  # noqa: E731
  images, labels = [], []
  for _ in range(renders):
    for i in idx:
      images.append(draw(digits.images[i]))
      labels.append(digits.target[i])
  images_arr = np.stack(images)
  images_arr.flags.writeable = False
  return images_arr, np.asarray(labels, np.int32)
