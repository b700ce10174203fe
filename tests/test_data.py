"""Input pipelines: sources, views, determinism, resume, per-host sharding, exact evaluation, bad input."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from moma_jax.data import augment, device, embedded, fake_imagenet, mixing, pipeline, sources
from moma_jax.data.augment import ViewSpec

from runlocal_helpers import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _h(a: np.ndarray) -> str:
  return hashlib.md5(np.ascontiguousarray(a).tobytes()).hexdigest()


def _take(it, n):
  return [next(it) for _ in range(n)]


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def imagenet_dir(tmp_path_factory):
  """The real tfds imagenet2012 builder, prepared offline from a fake manual_dir."""
  root = tmp_path_factory.mktemp('imagenet')
  manual = fake_imagenet.write_manual_dir(str(root / 'manual'), num_classes=3, images_per_class=4)
  data_dir = str(root / 'tfds')
  sources.open_split('imagenet2012', 'train', data_dir=data_dir, manual_dir=manual,
                     process_index=0, process_count=1)  # fmt: skip
  return data_dir


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """An image folder with the awkward files of real data."""
  root = tmp_path_factory.mktemp('folder')
  rng = np.random.RandomState(0)
  img = lambda h=60, w=80: rng.randint(0, 256, (h, w, 3)).astype(np.uint8)  # noqa: E731
  for split in ('train', 'val'):
    for c in ('cat', 'dog'):
      os.makedirs(root / split / c)
      for k in range(5):
        Image.fromarray(img()).save(root / split / c / f'{k}.jpg', quality=90)
  d = root / 'train' / 'cat'
  Image.fromarray(img()).convert('L').save(d / 'gray.jpg')
  Image.fromarray(img()).convert('CMYK').save(d / 'cmyk.jpg')
  Image.fromarray(img()).save(d / 'png_inside.jpg', format='PNG')
  Image.fromarray(img(5, 7)).save(d / 'tiny.jpg')
  (d / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg at all')
  good = (root / 'train' / 'dog' / '0.jpg').read_bytes()
  (d / 'truncated.jpg').write_bytes(good[: len(good) // 3])
  return str(root)


def _views(size=32, **kw):
  return {'v': ViewSpec(size=size, **kw)}


# --- embedded dataset ------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'name, lo, hi',
  # Raw-pixel k-NN measured: digits 0.84 (centred digits: pixels are a strong k-NN baseline; the
  # random positions keep their linear probe at ~0.37), digits_m 0.35 (the photo backgrounds).
  [('digits', 0.75, 0.95), ('digits_m', 0.25, 0.45)],
)
def test_embedded_datasets_are_deterministic_with_the_measured_pixel_baseline(name, lo, hi):
  from sklearn.neighbors import KNeighborsClassifier

  xtr, ytr = embedded.load('train', name)
  xte, yte = embedded.load('test', name)
  assert xtr.shape == (5748, 32, 32, 3) and xte.shape == (720, 32, 32, 3)
  assert xtr.dtype == np.uint8 and set(np.unique(ytr)) == set(range(10))
  embedded.load.cache_clear()  # the second load reads the disk cache the first one wrote
  np.testing.assert_array_equal(embedded.load('test', name)[0], xte)
  fresh, labels = embedded.render('test', name)  # drawn anew: the cache holds the same images
  np.testing.assert_array_equal(fresh, xte)
  np.testing.assert_array_equal(labels, yte)
  knn = KNeighborsClassifier(n_neighbors=20, metric='cosine').fit(xtr.reshape(len(xtr), -1), ytr)
  acc = (knn.predict(xte.reshape(len(xte), -1)) == yte).mean()
  assert lo < acc < hi, acc


# --- sources and views -----------------------------------------------------------------------------


def test_imagenet_through_the_real_tfds_builder(imagenet_dir):
  src = sources.open_split('imagenet2012', 'train', data_dir=imagenet_dir, process_index=0,
                           process_count=1)  # fmt: skip
  assert (src.num_examples, src.num_classes) == (12, 1000)
  views = {
    'teacher': ViewSpec(size=64),
    'student': ViewSpec(size=64, share_crop_with='teacher', jitter_prob=0.8, blur_prob=1.0),
    'moco2': augment.moco_strong_view(48, blur_prob=0.1, solarize_prob=0.2),
  }
  batch = next(pipeline.train_iterator(src, views, batch_size=4, seed=0))
  assert batch['teacher'].shape == (4, 64, 64, 3) and batch['moco2'].shape == (4, 48, 48, 3)
  assert batch['teacher'].dtype == np.uint8 and batch['label'].dtype == np.int32
  assert batch['teacher'].std() > 10  # real pixels, not padding
  val = sources.open_split('imagenet2012', 'validation', data_dir=imagenet_dir, process_index=0,
                           process_count=1)  # fmt: skip
  batches = list(pipeline.eval_iterator(val, _views(64, crop='center'), batch_size=4))
  assert sum(b['mask'].sum() for b in batches) == 10


def test_other_tfds_dataset_by_name(tmp_path):
  """Any tfds image dataset: a tiny builder registered here, prepared, then opened by name."""
  import tensorflow_datasets as tfds

  class MomaTinyShapes(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            'image': tfds.features.Image(shape=(40, 30, 3)),
            'label': tfds.features.ClassLabel(num_classes=3),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(9), 'test': self._generate_examples(4)}

    def _generate_examples(self, n):
      rng = np.random.RandomState(n)
      for i in range(n):
        yield i, {'image': rng.randint(0, 256, (40, 30, 3)).astype(np.uint8), 'label': i % 3}

  builder = MomaTinyShapes(data_dir=str(tmp_path / 'tfrecord'))
  builder.download_and_prepare()  # tfds's default format, TFRecord: sequential reads only
  open_ = lambda split, d: sources.open_split('moma_tiny_shapes', split, data_dir=str(tmp_path / d),  # noqa: E731
                                              process_index=0, process_count=1)  # fmt: skip
  ev = list(
    pipeline.eval_iterator(open_('test', 'tfrecord'), _views(24, crop='center'), batch_size=3)
  )
  assert sum(int(e['mask'].sum()) for e in ev) == 4  # evaluation reads TFRecord as it is
  src = open_('train', 'tfrecord')
  assert (src.num_examples, src.num_classes) == (9, 3)
  with pytest.raises(sources.DataError, match='tfds convert_format --dataset_version_dir=') as e:
    pipeline.train_iterator(src, _views(32), batch_size=6, seed=0)
  assert '\n' not in str(e.value)
  # Prepared as ArrayRecord (the message's second way), the same dataset trains and evaluates.
  MomaTinyShapes(data_dir=str(tmp_path / 'ar')).download_and_prepare(file_format='array_record')
  src = open_('train', 'ar')
  b = next(pipeline.train_iterator(src, _views(32), batch_size=6, seed=0))
  ev = list(pipeline.eval_iterator(open_('test', 'ar'), _views(24, crop='center'), batch_size=3))
  assert sum(int(e['mask'].sum()) for e in ev) == 4
  assert b['v'].shape == (6, 32, 32, 3) and src.lookup is not None


def test_image_folder_handles_awkward_files_and_counts_unreadable(folder):
  src = sources.open_split(f'folder:{folder}', 'train', process_index=0, process_count=1)
  assert src.num_examples == 16 and src.num_classes == 2
  it = pipeline.train_iterator(src, _views(32), batch_size=2, seed=0)
  batches = _take(it, 7)  # 14 of the 16 files are readable
  assert it.skipped == 2  # corrupt.jpg and truncated.jpg, counted, not fatal
  assert all(b['v'].shape == (2, 32, 32, 3) for b in batches)
  ev = pipeline.eval_iterator(src, _views(32, crop='center'), batch_size=4)
  seen = sum(int(b['mask'].sum()) for b in ev)
  assert seen == 14 and ev.skipped == 2


@pytest.mark.parametrize('name', ['gray.jpg', 'cmyk.jpg', 'png_inside.jpg', 'tiny.jpg'])
def test_awkward_images_decode_to_rgb(folder, name):
  import tensorflow as tf

  data = tf.constant(open(os.path.join(folder, 'train', 'cat', name), 'rb').read())
  views = {'a': ViewSpec(size=32), 'b': ViewSpec(size=32, crop='center')}
  out = augment.make_views(data, tf.constant([1, 2], tf.int64), views)
  for v in out.values():
    assert v.shape == (32, 32, 3) and v.dtype == tf.uint8


def test_views_shapes_ranges_and_shared_geometry():
  src = sources.open_split('digits', 'train', process_index=0, process_count=1)
  views = {
    'a': ViewSpec(size=32),
    'b': ViewSpec(size=32, share_crop_with='a'),  # same crop and flip, no photometric aug
    'c': ViewSpec(size=32, share_crop_with='a', jitter_prob=1.0, grayscale_prob=1.0),
    'd': ViewSpec(size=16, randaugment=(2, 9.0)),
    'e': ViewSpec(size=24, autoaugment=True),
  }
  b = next(pipeline.train_iterator(src, views, batch_size=8, seed=3))
  np.testing.assert_array_equal(b['a'], b['b'])
  assert not np.array_equal(b['a'], b['c'])
  np.testing.assert_array_equal(b['c'][..., 0], b['c'][..., 1])  # grayscale p=1
  assert b['d'].shape == (8, 16, 16, 3) and b['e'].shape == (8, 24, 24, 3)
  for k in 'abcde':
    assert b[k].dtype == np.uint8 and b[k].max() > 100 and b[k].min() < 60
  assert set(b['label']) <= set(range(10))


def test_eval_center_crop_resizes_shorter_side():
  import tensorflow as tf

  img = np.zeros((100, 200, 3), np.uint8)
  img[:, 100:] = 255  # right half white
  out = augment.center_crop(
    tf.constant(img), ViewSpec(size=56, crop='center', resize_ratio=64 / 56)
  )
  out = out.numpy()
  assert out.shape == (56, 56, 3)
  # shorter side 100 -> 64, long side 128; the centre 56 columns straddle the edge at 64
  assert out[:, :20].max() < 5 and out[:, -20:].min() > 250


def test_bad_view_option():
  with pytest.raises(ValueError, match='unknown view option'):
    pipeline.views_from_config({'v': {'size': 32, 'colour_jiter': 0.8}})
  with pytest.raises(
    ValueError, match=r'blur_sigma=\(0.1, 12.0\): need 0 < low <= high < size / 3'
  ):
    pipeline.views_from_config({'v': {'size': 32, 'blur_prob': 1.0, 'blur_sigma': (0.1, 12.0)}})


def test_blur_sigma_per_view():
  """The default is MoCo v3's (0.1, 2) px, unchanged; a view for small images can blur less."""
  import tensorflow as tf

  img = tf.constant(np.random.RandomState(0).randint(0, 256, (48, 48, 3)).astype(np.uint8))
  seed = tf.constant([3, 4], tf.int64)
  make = lambda **kw: augment.make_views(  # noqa: E731
    img, seed, {'v': ViewSpec(**{'size': 32, 'blur_prob': 1.0, **kw})}
  )['v']
  default, explicit = make(), make(blur_sigma=(0.1, 2.0))
  np.testing.assert_array_equal(default.numpy(), explicit.numpy())
  sharp = make(blur_prob=0.0).numpy().astype(float)
  small = make(blur_sigma=(0.01, 0.3)).numpy().astype(float)
  assert np.abs(small - sharp).mean() < 0.5 * np.abs(default.numpy() - sharp).mean()


# --- determinism, resume, hosts --------------------------------------------------------------------


def test_deterministic_for_a_seed():
  src = sources.open_split('digits', 'train', process_index=0, process_count=1)
  views = {'v': augment.moco_strong_view(32, blur_prob=1.0, solarize_prob=0.2)}
  a = _take(pipeline.train_iterator(src, views, batch_size=16, seed=7), 3)
  b = _take(pipeline.train_iterator(src, views, batch_size=16, seed=7), 3)
  c = _take(pipeline.train_iterator(src, views, batch_size=16, seed=8), 1)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x['v'], y['v'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert not np.array_equal(a[0]['v'], c[0]['v'])


def test_resume_at_a_step_across_epochs(folder):
  src = sources.open_split(f'folder:{folder}', 'val', process_index=0, process_count=1)  # 10 files
  views = {'v': ViewSpec(size=16, jitter_prob=0.8)}
  full = _take(pipeline.train_iterator(src, views, batch_size=4, seed=1), 8)  # 3.2 epochs
  it = pipeline.train_iterator(src, views, batch_size=4, seed=1)
  _take(it, 3)
  resumed = _take(
    pipeline.train_iterator(src, views, batch_size=4, seed=1, start_index=it.next_index), 5
  )
  for x, y in zip(full[3:], resumed, strict=True):
    np.testing.assert_array_equal(x['v'], y['v'])
    np.testing.assert_array_equal(x['label'], y['label'])
  # Each epoch is a fresh permutation of the 10 files.
  labels = np.concatenate([b['label'] for b in full])
  assert sorted(labels[:10]) == sorted(labels[10:20])


def _imagenet(imagenet_dir, process_index=0, process_count=1):
  return sources.open_split('imagenet2012', 'train', data_dir=imagenet_dir,
                            process_index=process_index, process_count=process_count)  # fmt: skip


def _identities(batches):
  """One hash per example: with a 'center' view the pixels depend on the example only."""
  return [_h(im) for b in batches for im in b['id']]


_ID_VIEWS = {'id': ViewSpec(size=24, crop='center'), 'v': ViewSpec(size=16, jitter_prob=0.8)}


def test_resume_from_any_position_equals_the_uninterrupted_stream(imagenet_dir):
  """Fake ImageNet through the real tfds builder (ArrayRecord): position 17 is mid-batch and in
  the second epoch (12 examples); the resumed stream is the uninterrupted one from there on."""
  src = _imagenet(imagenet_dir)
  full = _take(pipeline.train_iterator(src, _ID_VIEWS, batch_size=4, seed=5), 10)
  flat = {k: np.concatenate([b[k] for b in full]) for k in ('id', 'v', 'label')}
  it = pipeline.train_iterator(src, _ID_VIEWS, batch_size=4, seed=5, start_index=17)
  resumed = _take(it, 5)
  assert it.next_index == 37 and it.skipped == 0
  for k in ('id', 'v', 'label'):
    np.testing.assert_array_equal(np.concatenate([b[k] for b in resumed]), flat[k][17:37])


def test_every_epoch_is_a_fresh_permutation_of_the_whole_split(imagenet_dir):
  every = {_h(im) for b in pipeline.eval_iterator(_imagenet(imagenet_dir), _ID_VIEWS, batch_size=12)
           for im in b['id']}  # fmt: skip
  assert len(every) == 12
  ids = _identities(_take(pipeline.train_iterator(_imagenet(imagenet_dir), _ID_VIEWS, batch_size=4,
                                                  seed=0), 9))  # fmt: skip
  epochs = [ids[:12], ids[12:24], ids[24:]]
  for e in epochs:
    assert sorted(e) == sorted(every)  # each example exactly once
  assert len({tuple(e) for e in epochs}) == 3  # in a different order each epoch
  other_seed = _identities(_take(pipeline.train_iterator(_imagenet(imagenet_dir), _ID_VIEWS,
                                                         batch_size=4, seed=1), 3))  # fmt: skip
  assert other_seed != epochs[0]


@pytest.mark.parametrize('process_count', [2, 5])
def test_hosts_training_streams_are_disjoint_and_cover_the_split(imagenet_dir, process_count):
  """Each epoch, process p reads positions p, p + P, ... of one permutation of the whole split:
  disjoint parts, 12 // P each: all 12 for P = 2; for P = 5, 10 of them, not always the same."""
  per_host = 12 // process_count
  epochs = [[] for _ in range(3)]
  for p in range(process_count):
    src = _imagenet(imagenet_dir, p, process_count)
    ids = _identities(
      _take(pipeline.train_iterator(src, _ID_VIEWS, batch_size=per_host, seed=3), 3)
    )
    for e in range(3):
      epochs[e] += ids[e * per_host : (e + 1) * per_host]
  for e in epochs:
    assert len(e) == len(set(e)) == per_host * process_count  # disjoint
  if process_count == 2:
    assert all(len(set(e)) == 12 for e in epochs)  # covering
  else:
    assert len(set(epochs[0]) | set(epochs[1]) | set(epochs[2])) == 12


def test_non_local_paths(tmp_path):
  """Data paths go through tf.io.gfile, never os.path: the fake ImageNet writer and an image
  folder on TensorFlow's in-memory file system (ram://, like gs:// a URI)."""
  import tarfile

  import tensorflow as tf

  manual = fake_imagenet.write_manual_dir('ram://moma/manual', num_classes=2, images_per_class=2,
                                          num_val=1, size=(40, 50))  # fmt: skip
  with tf.io.gfile.GFile(f'{manual}/ILSVRC2012_img_train.tar', 'rb') as f:
    with tarfile.open(fileobj=f) as t:
      assert len(t.getnames()) == 2
  rng = np.random.RandomState(0)
  for c in ('a', 'b'):
    for k in range(3):
      data = fake_imagenet.jpeg_bytes(rng.randint(0, 256, (30, 40, 3)).astype(np.uint8))
      tf.io.gfile.makedirs(f'ram://moma/folder/{c}')
      with tf.io.gfile.GFile(f'ram://moma/folder/{c}/{k}.jpg', 'wb') as f:
        f.write(data)
  src = sources.open_split('folder:ram://moma/folder', 'train', process_index=0, process_count=1)
  assert (src.total_examples, src.num_classes) == (6, 2)
  b = _take(pipeline.train_iterator(src, _views(16), batch_size=3, seed=0), 4)
  assert sorted(np.concatenate([x['label'] for x in b[:2]])) == [0, 0, 0, 1, 1, 1]


def test_hosts_read_disjoint_parts(imagenet_dir):
  seen = []
  for p in range(2):
    src = sources.open_split('imagenet2012', 'train', data_dir=imagenet_dir, process_index=p,
                             process_count=2)  # fmt: skip
    batches = list(pipeline.eval_iterator(src, _views(32, crop='center'), batch_size=3,
                                          process_count=2))  # fmt: skip
    seen.append({_h(im) for b in batches for im, m in zip(b['v'], b['mask'], strict=True) if m})
  assert len(seen[0]) == len(seen[1]) == 6
  assert not seen[0] & seen[1]


def test_two_real_processes_read_disjoint_examples(tmp_path):
  """jax.distributed on loopback: each process opens the split with its own process index."""
  script = textwrap.dedent(f"""
    import sys, hashlib, jax
    sys.path.insert(0, {ROOT!r})
    pid = int(sys.argv[1])
    jax.distributed.initialize('127.0.0.1:' + sys.argv[2], num_processes=2, process_id=pid)
    from moma_jax.data import sources, pipeline
    from moma_jax.data.augment import ViewSpec
    src = sources.open_split('digits', 'test')
    it = pipeline.eval_iterator(src, {{'v': ViewSpec(size=32, crop='center')}}, batch_size=64,
                                process_count=jax.process_count())
    with open(sys.argv[3], 'w') as f:
      for b in it:
        for im, m in zip(b['v'], b['mask']):
          if m:
            f.write(hashlib.md5(im.tobytes()).hexdigest() + '\\n')
  """)
  path = tmp_path / 'proc.py'
  path.write_text(script)
  import socket

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = str(s.getsockname()[1])
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': FAST_COMPILE}
  procs = [
    subprocess.Popen([sys.executable, str(path), str(i), port, str(tmp_path / f'{i}.txt')], env=env)
    for i in range(2)
  ]
  assert [p.wait(timeout=240) for p in procs] == [0, 0]
  parts = [set((tmp_path / f'{i}.txt').read_text().split()) for i in range(2)]
  assert len(parts[0]) == len(parts[1]) == 360 and not parts[0] & parts[1]


def test_eval_sees_every_example_exactly_once_with_padding():
  xte, _ = embedded.load('test')
  expected = sorted(_h(x) for x in xte)
  got = []
  for p in range(3):  # 720 examples over 3 hosts, batch 50 -> 5 batches each, last one padded
    src = sources.open_split('digits', 'test', process_index=p, process_count=3)
    batches = list(pipeline.eval_iterator(src, _views(32, crop='center', resize_ratio=1.0),
                                          batch_size=50, process_count=3))  # fmt: skip
    assert len(batches) == 5
    got += [_h(im) for b in batches for im, m in zip(b['v'], b['mask'], strict=True) if m]
  assert sorted(got) == expected


# --- bad input -------------------------------------------------------------------------------------


def test_empty_class_folder(tmp_path):
  os.makedirs(tmp_path / 'train' / 'a')
  os.makedirs(tmp_path / 'train' / 'b')
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'train' / 'a' / 'x.png')
  with pytest.raises(sources.DataError, match=r'train/b holds no images'):
    sources.open_split(f'folder:{tmp_path}', 'train', process_index=0, process_count=1)


def test_unknown_dataset_name():
  with pytest.raises(sources.DataError, match="unknown dataset 'imagenet2013'"):
    sources.open_split('imagenet2013', 'train', process_index=0, process_count=1)


def test_unprepared_imagenet_says_how_to_prepare(tmp_path):
  with pytest.raises(sources.DataError, match='manual_dir'):
    sources.open_split('imagenet2012', 'train', data_dir=str(tmp_path), process_index=0,
                       process_count=1)  # fmt: skip


def test_missing_split(imagenet_dir):
  with pytest.raises(sources.DataError, match="no split 'val'"):
    sources.open_split('imagenet2012', 'val', data_dir=imagenet_dir, process_index=0,
                       process_count=1)  # fmt: skip


# --- delivery to devices and on-device mixing ------------------------------------------------------


def test_global_batch_over_8_devices():
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ('data',))
  per_host = device.check_batch_size(16, mesh, ('data',))
  sharding = device.batch_sharding(mesh, ('data',))
  local = {'v': np.arange(per_host * 4).reshape(per_host, 2, 2).astype(np.uint8)}
  out = list(device.prefetch_to_device([local, local, local], sharding))
  assert len(out) == 3
  arr = out[0]['v']
  assert arr.shape == (16, 2, 2) and len(arr.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(arr), local['v'])
  with pytest.raises(ValueError, match='not divisible by the 8 data-parallel devices'):
    device.check_batch_size(12, mesh, ('data',))


def test_mixup_cutmix_labels_sum_to_one_and_match_areas():
  b, h, w = 4, 16, 16
  images = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None], (b, h, w, 3))
  targets = jax.nn.one_hot(jnp.arange(b), b)
  for seed in range(20):
    for kw in ({'mixup_alpha': 0.0}, {'cutmix_alpha': 0.0}, {}):
      out, t = mixing.mixup_cutmix(jax.random.key(seed), images, targets, **kw)
      np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-6)
      if kw.get('mixup_alpha') == 0.0:  # cutmix: label weight == fraction of own pixels
        own = (out[..., 0] == images[..., 0]).mean(axis=(1, 2))
        if b % 2 == 0:
          np.testing.assert_allclose(own, t[jnp.arange(b), jnp.arange(b)], atol=1e-6)
      if kw.get('cutmix_alpha') == 0.0:  # mixup: pixel value is the label-weighted mean
        expected = (t * jnp.arange(b, dtype=jnp.float32)).sum(-1)
        np.testing.assert_allclose(out[:, 0, 0, 0], expected, atol=1e-5)


def test_random_erasing_and_normalize():
  x = mixing.normalize(jnp.full((8, 16, 16, 3), 255, jnp.uint8))
  np.testing.assert_allclose(
    x[0, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-6
  )
  erased = mixing.random_erasing(jax.random.key(0), x, prob=1.0)
  changed = (erased != x).any(-1).mean(axis=(1, 2))
  assert (changed > 0).all() and (changed <= 1 / 3 + 0.05).all()
  assert (mixing.random_erasing(jax.random.key(0), x, prob=0.0) == x).all()


def _broken_folder(root, good: int, bad: int) -> set[str]:
  """A folder of `good` readable and `bad` undecodable JPEGs; returns the broken files' paths."""
  rng = np.random.RandomState(0)
  broken = set()
  for k in range(good + bad):
    d = root / 'train' / ('a' if k % 2 else 'b')
    os.makedirs(d, exist_ok=True)
    if k < good:
      Image.fromarray(rng.randint(0, 256, (40, 40, 3)).astype(np.uint8)).save(d / f'{k}.jpg')
    else:
      (d / f'{k}.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a jpeg ' + bytes([k % 256]))
      broken.add(str(d / f'{k}.jpg'))
  return broken


def test_all_unreadable_folder_stops_the_run_with_one_line_naming_a_file(tmp_path):
  """Every file broken: the run ends at once (not an endless read), one line, exit 2."""
  broken = _broken_folder(tmp_path / 'data', good=0, bad=12)
  wd = tmp_path / 'wd'
  p = subprocess.run(
    [sys.executable, 'main.py', '--config=configs/mae_pretrain.py:runlocal', f'--workdir={wd}',
     f'--config.data.name=folder:{tmp_path / "data"}', '--config.evaluators.knn.before=False',
     '--config.evaluators.knn.at_end=False', '--config.batch_size=8'],  # 12 files: batch 8 fits
    cwd=ROOT, capture_output=True, text=True, timeout=300,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': FAST_COMPILE},
  )  # fmt: skip
  errors = [ln for ln in p.stderr.splitlines() if ln.startswith('error: ')]
  assert p.returncode == 2 and len(errors) == 1, p.stderr[-3000:]
  assert 'could not be read or decoded, the first is ' in errors[0]
  assert errors[0].split('the first is ')[1].split(';')[0] in broken


def test_a_long_run_of_unreadable_images_mid_stream_names_its_first_file(tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline, 'MAX_UNREADABLE_IN_A_ROW', 4)
  broken = _broken_folder(tmp_path, good=30, bad=30)
  src = sources.open_split(f'folder:{tmp_path}', 'train', process_index=0, process_count=1)
  it = pipeline.train_iterator(src, _views(16), batch_size=2, seed=0)
  with pytest.raises(sources.DataError, match=r'\d+ training images in a row') as e:
    _take(it, 200)  # 200 batches: 400 examples, about 7 epochs of the 60 files
  assert str(e.value).split('the first is ')[1].split(';')[0] in broken
  assert it.skipped > 0  # shorter runs before it were skipped, not fatal
