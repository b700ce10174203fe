"""Where examples come from: tfds datasets, a local image folder, the embedded 'digits_m'.

A source gives this host's part of a split as a finite tf.data.Dataset of
{'image': encoded bytes (tf.string) or uint8 [H, W, 3], 'label': int64}, in a fixed order and
*undecoded*: decoding happens in the pipeline, fused with the crop, and skipping records on resume
is cheap. Each process reads a disjoint part (``tfds.split_for_jax_process`` for tfds; an even
split of a fixed permutation otherwise).

Dataset names:
  digits_m              the embedded offline dataset (moma_jax.data.embedded)
  folder:/path/to/dir   class sub-folders of images; DIR/<split>/<class>/* if DIR/<split> exists,
                        else DIR/<class>/* is the 'train' split
  anything else         a tfds dataset name (imagenet2012, cifar10, imagenette/320px-v2, ...)
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')


class DataError(ValueError):
  """A dataset that cannot be read as configured; the message says what to do."""


@dataclasses.dataclass
class HostSplit:
  """This process's part of a split."""

  dataset: tf.data.Dataset  # finite, fixed order, undecoded
  num_examples: int  # in this process's part
  total_examples: int  # across all processes
  num_classes: int
  name: str


def _host_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  bounds = np.linspace(0, n, process_count + 1).round().astype(int)
  return int(bounds[process_index]), int(bounds[process_index + 1])


def _embedded(split: str, process_index: int, process_count: int) -> HostSplit:
  from moma_jax.data import embedded

  if split not in ('train', 'test'):
    raise DataError(f"digits_m has splits 'train' and 'test', not {split!r}")
  images, labels = embedded.load(split)
  lo, hi = _host_range(len(labels), process_index, process_count)
  ds = tf.data.Dataset.from_tensor_slices(
    {'image': images[lo:hi], 'label': labels[lo:hi].astype(np.int64)}
  )
  return HostSplit(ds, hi - lo, len(labels), embedded.NUM_CLASSES, f'digits_m/{split}')


def list_image_folder(root: str, split: str) -> tuple[list[str], list[int], list[str]]:
  """(files, labels, class names) of an image folder, files sorted by class then name."""
  split_dir = os.path.join(root, split)
  if not tf.io.gfile.isdir(root):
    raise DataError(f'image folder {root} does not exist')
  if not tf.io.gfile.isdir(split_dir):
    if split != 'train':
      raise DataError(f'image folder {root} has no {split!r} sub-folder ({split_dir})')
    split_dir = root
  classes = sorted(
    d for d in tf.io.gfile.listdir(split_dir) if tf.io.gfile.isdir(os.path.join(split_dir, d))
  )
  classes = [c.rstrip('/') for c in classes]
  if not classes:
    raise DataError(f'{split_dir} has no class sub-folders; expected {split_dir}/<class>/<image>')
  files, labels = [], []
  for label, c in enumerate(classes):
    names = sorted(
      f
      for f in tf.io.gfile.listdir(os.path.join(split_dir, c))
      if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not names:
      raise DataError(
        f'class folder {os.path.join(split_dir, c)} holds no images '
        f'({", ".join(IMAGE_EXTENSIONS)}); add images or remove the folder'
      )
    files += [os.path.join(split_dir, c, f) for f in names]
    labels += [label] * len(names)
  return files, labels, classes


def _folder(root: str, split: str, process_index: int, process_count: int) -> HostSplit:
  files, labels, classes = list_image_folder(root, split)
  # A fixed permutation before the per-host split, so every host sees every class.
  order = np.random.RandomState(0).permutation(len(files))
  lo, hi = _host_range(len(files), process_index, process_count)
  part = order[lo:hi]
  ds = tf.data.Dataset.from_tensor_slices(
    {'path': np.asarray(files)[part], 'label': np.asarray(labels, np.int64)[part]}
  )
  ds = ds.map(lambda ex: {'image': tf.io.read_file(ex['path']), 'label': ex['label']})
  return HostSplit(ds, hi - lo, len(files), len(classes), f'folder:{root}/{split}')


_PREPARE_IMAGENET = (
  'download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org into a folder '
  'M, then prepare once with data.manual_dir=M (or: tfds build imagenet2012 --manual_dir=M '
  '--data_dir=D)'
)


def _tfds(
  name: str,
  split: str,
  data_dir: str | None,
  manual_dir: str | None,
  process_index: int,
  process_count: int,
) -> HostSplit:
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(
      f'unknown dataset {name!r}: not a tfds dataset, nor digits_m, nor folder:/path'
    ) from None
  if not builder.is_prepared():
    if manual_dir:
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
      )
    elif name.split('/')[0] == 'imagenet2012':
      raise DataError(f'imagenet2012 is not prepared in data_dir={data_dir}: {_PREPARE_IMAGENET}')
    else:
      raise DataError(
        f'{name} is not prepared in data_dir={data_dir}; prepare it once where there is '
        f'internet: tfds build {name} --data_dir=DIR, then point data.data_dir at DIR'
      )
  splits = builder.info.splits
  if split.split('[')[0] not in splits:
    raise DataError(f'{name} has no split {split!r}; it has {", ".join(splits)}')
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise DataError(f'{name} has no image/label features (it has {", ".join(features)})')
  host_split = tfds.split_for_jax_process(
    split, process_index=process_index, process_count=process_count
  )
  ds = builder.as_dataset(
    split=host_split,
    shuffle_files=False,
    decoders={'image': tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(add_tfds_id=False),
  )
  ds = ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})
  return HostSplit(
    ds,
    splits[host_split].num_examples,
    splits[split].num_examples,
    features['label'].num_classes,
    f'{name}/{split}',
  )


def open_split(
  name: str,
  split: str,
  *,
  data_dir: str | None = None,
  manual_dir: str | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> HostSplit:
  """Opens this process's part of ``split`` of dataset ``name`` (see the module docstring)."""
  if process_index is None or process_count is None:
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
  if name == 'digits_m':
    return _embedded(split, process_index, process_count)
  if name.startswith('folder:'):
    return _folder(name[len('folder:') :], split, process_index, process_count)
  return _tfds(name, split, data_dir, manual_dir, process_index, process_count)
