"""Writes a tiny fake ImageNet manual_dir in the real layout, so the real tfds ``imagenet2012``
builder prepares it offline (tests, and trying the ImageNet configs without ImageNet).

Layout (as distributed by image-net.org):
  ILSVRC2012_img_train.tar   one inner tar per synset (n01440764.tar, ...), each holding
                             JPEGs named <synset>_<k>.JPEG
  ILSVRC2012_img_val.tar     ILSVRC2012_val_00000001.JPEG ... (labels come from tfds's own
                             validation_labels.txt, in file-name order)

The train set includes the awkward files real ImageNet has: one CMYK JPEG and one PNG named .JPEG
(under the file names the tfds builder knows and converts), and a grayscale JPEG.

  python -m moma_jax.data.fake_imagenet --out /tmp/fake_imagenet_manual

``out`` may be any path tf.io.gfile writes (a local folder, gs://bucket/dir, ...).
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from collections.abc import Iterator

import numpy as np
from PIL import Image

from moma_jax.data.tf_quiet import tf

CMYK_FILE = ('n01739381', 'n01739381_1309.JPEG')
PNG_FILE = ('n02105855', 'n02105855_2933.JPEG')


def _photo(rng: np.random.RandomState, size: tuple[int, int], noise: int = 12) -> np.ndarray:
  """A smooth random colour image [h, w, 3] uint8 plus uniform pixel noise in [-noise, noise]
  (compresses like a photo, not like noise: 500 x 375 at quality 90 is ~60 KB with noise 12,
  ~110 KB, ImageNet's average file size, with noise 40)."""
  h, w = size
  coarse = rng.randint(0, 256, size=(h // 25 + 2, w // 25 + 2, 3)).astype(np.uint8)
  img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
  speckle = rng.randint(-noise, noise + 1, size=(h, w, 3))
  return np.clip(np.asarray(img, np.int32) + speckle, 0, 255).astype(np.uint8)


def jpeg_bytes(array: np.ndarray, mode: str = 'RGB', fmt: str = 'JPEG', quality: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).convert(mode).save(buf, format=fmt, quality=quality)
  return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


class _Counted:
  """A write-only stream that knows its position (tarfile asks; not every file system answers)."""

  def __init__(self, f):
    self._f, self._pos = f, 0

  def write(self, data: bytes) -> int:
    self._f.write(data)
    self._pos += len(data)
    return len(data)

  def tell(self) -> int:
    return self._pos


@contextlib.contextmanager
def _open_tar(folder: str, name: str) -> Iterator[tarfile.TarFile]:
  with tf.io.gfile.GFile(tf.io.gfile.join(folder, name), 'wb') as f:
    with tarfile.open(fileobj=_Counted(f), mode='w') as tar:
      yield tar


def _synsets(num_classes: int) -> list[str]:
  import tensorflow_datasets as tfds

  path = tfds.core.tfds_path('datasets/imagenet2012/labels.txt')
  labels = path.read_text().split()
  chosen = [CMYK_FILE[0], PNG_FILE[0]]
  chosen += [s for s in labels if s not in chosen][: max(0, num_classes - 2)]
  return chosen[:num_classes]


def write_manual_dir(
  out: str,
  *,
  num_classes: int = 4,
  images_per_class: int = 5,
  num_val: int = 10,
  size: tuple[int, int] = (375, 500),
  noise: int = 12,
  seed: int = 0,
) -> str:
  """Writes ILSVRC2012_img_{train,val}.tar under ``out``; returns ``out``.

  Images are ``size`` (h, w); ``noise`` sets their detail, hence file size and decoding cost.
  """
  if num_classes < 2:
    raise ValueError('num_classes must be >= 2 (the CMYK and PNG synsets)')
  tf.io.gfile.makedirs(out)
  rng = np.random.RandomState(seed)
  with _open_tar(out, 'ILSVRC2012_img_train.tar') as train:
    for synset in _synsets(num_classes):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as t:
        for k in range(images_per_class):
          name = f'{synset}_{k + 1}.JPEG'
          img = _photo(rng, size, noise)
          if k == 0 and synset == CMYK_FILE[0]:
            name, data = CMYK_FILE[1], jpeg_bytes(img, mode='CMYK')
          elif k == 0 and synset == PNG_FILE[0]:
            name, data = PNG_FILE[1], jpeg_bytes(img, fmt='PNG')
          elif k == 1:
            data = jpeg_bytes(img, mode='L')  # grayscale JPEG
          else:
            data = jpeg_bytes(img)
          _add(t, name, data)
      _add(train, f'{synset}.tar', inner.getvalue())
  with _open_tar(out, 'ILSVRC2012_img_val.tar') as val:
    for i in range(num_val):
      _add(val, f'ILSVRC2012_val_{i + 1:08d}.JPEG', jpeg_bytes(_photo(rng, size, noise)))
  return out


def main() -> None:
  import argparse

  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True)
  p.add_argument('--num-classes', type=int, default=4)
  p.add_argument('--images-per-class', type=int, default=5)
  p.add_argument('--num-val', type=int, default=10)
  p.add_argument('--noise', type=int, default=12, help='detail: 40 gives ImageNet-sized files')
  a = p.parse_args()
  write_manual_dir(
    a.out,
    num_classes=a.num_classes,
    images_per_class=a.images_per_class,
    num_val=a.num_val,
    noise=a.noise,
  )
  print(f'wrote {a.out}')


if __name__ == '__main__':
  main()
