"""Where examples come from: tfds datasets, a local image folder, the embedded digits.

A source opens one split for this process and gives two ways in, both *undecoded*
({'image': encoded bytes (tf.string) or uint8 [H, W, 3], 'label': int64}; decoding happens in the
pipeline, fused with the crop):

  random access   ``lookup(indices [k])`` fetches the stored records of any examples of the
                  *whole* split (0 <= index < total_examples) in one call, then ``load(record)``
                  turns one record into an example (for a folder: reads the file), both graph
                  code for tf.data. The training stream (pipeline.train_iterator) reads through
                  them: a fresh random permutation of the whole split per epoch, each process
                  taking its own positions of it, so resuming at any stream position costs
                  nothing. Fetching in blocks keeps Python (tfds's ArrayRecord reader) to one call
                  per block: a busy training process's GIL is not taken once per image.
  dataset         this process's part in a fixed order (a finite tf.data.Dataset), for
                  evaluation: the processes' parts are disjoint and cover the split.

How each source does random access:
  digits, digits_m      the embedded offline datasets (moma_jax.data.embedded), in memory
  folder:/path/to/dir   class sub-folders of images, a lookup reads one file; DIR/<split>/<class>/*
                        if DIR/<split> exists, else DIR/<class>/* is the 'train' split
  anything else         a tfds dataset name (imagenet2012, cifar10, imagenette/320px-v2, ...),
                        read from ArrayRecord files through tfds's data source
                        (``builder.as_data_source``). tfds's default TFRecord format has no
                        random access: such a copy still serves evaluation, and training stops
                        with a DataError giving the one command that converts it in place. What
                        we prepare ourselves (``manual_dir``) is written as ArrayRecord.

Paths may be local or object-store URIs (gs://...): they only go through tf.io.gfile, tfds and
ArrayRecord's own readers, never os.path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from moma_jax.data.embedded import NAMES as EMBEDDED
from moma_jax.data.tf_quiet import graph_fn, tf

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')

Lookup = Callable[[tf.Tensor], dict[str, tf.Tensor]]  # int64 [k] -> stored records, [k, ...] each
Load = Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]  # one record -> {'image', 'label'}


def _identity(record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  return record


class DataError(ValueError):
  """A dataset that cannot be read as configured; the message says what to do."""


class NotPrepared(DataError):
  """A tfds dataset not prepared in its data_dir (and no manual_dir to prepare it from)."""


# Train-split sizes (examples, classes) of datasets a plan or a dry run may name without having
# them prepared here (the tfds catalogue's figures).
KNOWN_SPLITS = {
  ('imagenet2012', 'train'): (1_281_167, 1000),
  ('imagenet2012', 'validation'): (50_000, 1000),
  ('cifar10', 'train'): (50_000, 10),
  ('cifar100', 'train'): (50_000, 100),
  ('oxford_flowers102', 'train'): (1_020, 102),
}


@dataclasses.dataclass
class HostSplit:
  """This process's view of a split (see the module docstring)."""

  dataset: tf.data.Dataset  # this process's part: finite, fixed order, undecoded
  num_examples: int  # in this process's part
  total_examples: int  # across all processes
  num_classes: int
  name: str
  lookup: Lookup | None = None  # batched random access to the whole split; None: none possible
  load: Load = _identity  # one record -> one example (graph code, per example)
  no_random_access: str = ''  # why lookup is None, and what to do
  process_index: int = 0
  process_count: int = 1
  files: list[str] | None = None  # a folder's files, by record index

  def describe(self, index: int) -> str:
    """Names record ``index`` of the split for messages: a folder's file, else its index."""
    if self.files is not None:
      return f'is {self.files[index]}'
    return f'is record {index} of {self.name}'

  def random_access(self) -> tuple[Lookup, Load]:
    """(``lookup``, ``load``), or a DataError saying how to make the dataset randomly accessible."""
    if self.lookup is None:
      raise DataError(self.no_random_access)
    return self.lookup, self.load


def _host_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  bounds = np.linspace(0, n, process_count + 1).round().astype(int)
  return int(bounds[process_index]), int(bounds[process_index + 1])


LOOKUP_BLOCK = 32  # indices fetched per lookup call


def _part(indices: tf.data.Dataset, lookup: Lookup, load: Load = _identity) -> tf.data.Dataset:
  """The examples at ``indices``, in order, fetched in blocks and loaded in parallel."""
  par = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = indices.batch(LOOKUP_BLOCK).map(graph_fn(lookup), **par).unbatch()
  return ds.map(graph_fn(load), **par)


def _gather(columns: dict[str, np.ndarray]) -> Lookup:
  """Random access to arrays held in memory."""
  tensors = {k: tf.constant(v) for k, v in columns.items()}

  def lookup(indices: tf.Tensor) -> dict[str, tf.Tensor]:
    return {k: tf.gather(v, indices) for k, v in tensors.items()}

  return lookup


def _embedded(name: str, split: str, process_index: int, process_count: int) -> HostSplit:
  from moma_jax.data import embedded

  if split not in ('train', 'test'):
    raise DataError(f"{name} has splits 'train' and 'test', not {split!r}")
  images, labels = embedded.load(split, name)
  lookup = _gather({'image': images, 'label': labels.astype(np.int64)})
  lo, hi = _host_range(len(labels), process_index, process_count)
  ds = _part(tf.data.Dataset.range(lo, hi), lookup)
  return HostSplit(
    ds, hi - lo, len(labels), embedded.NUM_CLASSES, f'{name}/{split}', lookup,
    process_index=process_index, process_count=process_count,
  )  # fmt: skip


def list_image_folder(root: str, split: str) -> tuple[list[str], list[int], list[str]]:
  """(files, labels, class names) of an image folder, files sorted by class then name."""
  join = tf.io.gfile.join
  split_dir = join(root, split)
  if not tf.io.gfile.isdir(root):
    raise DataError(f'image folder {root} does not exist')
  if not tf.io.gfile.isdir(split_dir):
    if split != 'train':
      raise DataError(f'image folder {root} has no {split!r} sub-folder ({split_dir})')
    split_dir = root
  classes = sorted(
    d.rstrip('/') for d in tf.io.gfile.listdir(split_dir) if tf.io.gfile.isdir(join(split_dir, d))
  )
  if not classes:
    raise DataError(f'{split_dir} has no class sub-folders; expected {split_dir}/<class>/<image>')
  files, labels = [], []
  for label, c in enumerate(classes):
    class_dir = join(split_dir, c)
    names = sorted(
      f for f in tf.io.gfile.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not names:
      raise DataError(
        f'class folder {class_dir} holds no images ({", ".join(IMAGE_EXTENSIONS)}); add images '
        'or remove the folder'
      )
    files += [join(class_dir, f) for f in names]
    labels += [label] * len(names)
  return files, labels, classes


def _folder(root: str, split: str, process_index: int, process_count: int) -> HostSplit:
  files, labels, classes = list_image_folder(root, split)
  lookup = _gather({'path': np.asarray(files), 'label': np.asarray(labels, np.int64)})

  def load(record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:  # reads in the parallel map
    return {'image': tf.io.read_file(record['path']), 'label': record['label']}

  # Evaluation parts: a fixed permutation before the per-host split, so every host sees every class.
  order = np.random.RandomState(0).permutation(len(files)).astype(np.int64)
  lo, hi = _host_range(len(files), process_index, process_count)
  ds = _part(tf.data.Dataset.from_tensor_slices(order[lo:hi]), lookup, load)
  return HostSplit(
    ds, hi - lo, len(files), len(classes), f'folder:{root}/{split}', lookup, load,
    process_index=process_index, process_count=process_count, files=files,
  )  # fmt: skip


_PREPARE_IMAGENET = (
  'download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org into a folder '
  'M, then prepare once with data.manual_dir=M (or: tfds build imagenet2012 --manual_dir=M '
  '--data_dir=D --file_format=array_record)'
)


def _tfds_random_access(builder, split: str) -> tuple[Lookup, Load] | None:
  """(lookup, load) of ``split`` through tfds's ArrayRecord data source; None for TFRecord data.

  A lookup is one Python call per block (ArrayRecord reads the records in C++, in parallel) that
  returns raw serialized tf.train.Examples; each is parsed in the graph, only 'image' (bytes,
  undecoded) and 'label'.
  """
  import tensorflow_datasets as tfds

  try:
    records = builder.as_data_source(
      split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )
  except NotImplementedError:  # no random-access file format in data_dir
    return None
  spec = builder.info.features.tf_example_spec
  spec = {'image': spec['image'], 'label': spec['label']}

  def read(indices: np.ndarray) -> np.ndarray:
    return np.asarray(records.__getitems__(indices.tolist()), dtype=object)

  def lookup(indices: tf.Tensor) -> dict[str, tf.Tensor]:
    raw = tf.numpy_function(read, [indices], tf.string, stateful=False)
    return {'raw': tf.ensure_shape(raw, indices.shape)}

  def load(record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return tf.io.parse_single_example(record['raw'], spec)

  return lookup, load


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
      f'unknown dataset {name!r}: not a tfds dataset, nor digits / digits_m, nor folder:/path'
    ) from None
  if not builder.is_prepared():
    if manual_dir:  # ArrayRecord, so that training can read it in any order
      builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
      )
    elif name.split('/')[0] == 'imagenet2012':
      raise NotPrepared(f'imagenet2012 is not prepared in data_dir={data_dir}: {_PREPARE_IMAGENET}')
    else:
      raise NotPrepared(
        f'{name} is not prepared in data_dir={data_dir}; prepare it once where there is '
        f'internet: tfds build {name} --data_dir=DIR --file_format=array_record, then point '
        'data.data_dir at DIR'
      )
  splits = builder.info.splits
  if split.split('[')[0] not in splits:
    raise DataError(f'{name} has no split {split!r}; it has {", ".join(splits)}')
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise DataError(f'{name} has no image/label features (it has {", ".join(features)})')
  total = splits[split].num_examples
  full_name = f'{name}/{split}'
  access = _tfds_random_access(builder, split)
  if access is not None:
    lo, hi = _host_range(total, process_index, process_count)
    return HostSplit(
      _part(tf.data.Dataset.range(lo, hi), *access), hi - lo, total,
      features['label'].num_classes, full_name, *access, process_index=process_index,
      process_count=process_count,
    )  # fmt: skip
  # TFRecord only: sequential reads serve evaluation; training needs the conversion below.
  host_split = tfds.split_for_jax_process(
    split, process_index=process_index, process_count=process_count
  )
  ds = builder.as_dataset(
    split=host_split,
    shuffle_files=False,
    decoders={'image': tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(add_tfds_id=False),
  )
  ds = ds.map(graph_fn(lambda ex: {'image': ex['image'], 'label': ex['label']}))
  why = (
    f'{name} in {builder.data_dir} is stored as TFRecord, which training cannot read in random '
    'order; add ArrayRecord files beside it once (pip install apache-beam, then tfds '
    f'convert_format --dataset_version_dir={builder.data_dir} --out_file_format=array_record) '
    'or prepare it anew with tfds build --file_format=array_record'
  )
  return HostSplit(
    ds, splits[host_split].num_examples, total, features['label'].num_classes, full_name,
    no_random_access=why, process_index=process_index, process_count=process_count,
  )  # fmt: skip


def open_split(
  name: str,
  split: str,
  *,
  data_dir: str | None = None,
  manual_dir: str | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> HostSplit:
  """Opens ``split`` of dataset ``name`` for this process (see the module docstring)."""
  if process_index is None or process_count is None:
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
  if name in EMBEDDED:
    return _embedded(name, split, process_index, process_count)
  if name.startswith('folder:'):
    return _folder(name[len('folder:') :], split, process_index, process_count)
  return _tfds(name, split, data_dir, manual_dir, process_index, process_count)
