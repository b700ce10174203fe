"""Bad input to the converter: one clear line, exit code 2, nothing written, no code run."""

from __future__ import annotations

import collections
import io
import os
import struct
import zipfile

import numpy as np
import pytest
import torch

from convert import torch_format
from convert.__main__ import main as cli
from convert.errors import ConvertError

import torch_reference as ref


@pytest.fixture(scope='module')
def mae_ckpt(tmp_path_factory) -> str:
  torch.manual_seed(0)
  tm = ref.VisionTransformer(32, 8, 64, 2, 4)
  return ref.save_mae(tm, str(tmp_path_factory.mktemp('ckpt') / 'mae.pth'))


def _run_fails(capsys, args: list[str], *needles: str) -> str:
  assert cli(args) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and '\n' not in err, err
  for n in needles:
    assert n in err, err
  return err


def _leftovers(d) -> list[str]:
  return sorted(os.listdir(d))


def test_missing_file(tmp_path, capsys):
  _run_fails(capsys, ['--src', str(tmp_path / 'nope.pth'), '--dst', str(tmp_path / 'o')], 'no such')
  assert _leftovers(tmp_path) == []


def test_truncated_zip(tmp_path, capsys, mae_ckpt):
  data = open(mae_ckpt, 'rb').read()
  src = tmp_path / 'trunc.pth'
  src.write_bytes(data[: len(data) // 2])
  _run_fails(capsys, ['--src', str(src), '--dst', str(tmp_path / 'o')], 'trunc.pth')
  assert _leftovers(tmp_path) == ['trunc.pth']


def test_not_a_checkpoint(tmp_path, capsys):
  src = tmp_path / 'notes.txt'
  src.write_text('hello, I am not a checkpoint')
  _run_fails(capsys, ['--src', str(src), '--dst', str(tmp_path / 'o')], 'not a readable')


def test_unknown_state_dict_lists_keys_with_shapes(tmp_path, capsys):
  src = str(tmp_path / 'resnet.pth')
  torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7), 'fc.weight': torch.zeros(10, 512)}, src)
  _run_fails(
    capsys,
    ['--src', src, '--dst', str(tmp_path / 'o')],
    'missing cls_token, pos_embed, patch_embed.proj.weight',
    'conv1.weight (64, 3, 7, 7)',
  )


def test_missing_and_unexpected_keys_listed(tmp_path, capsys):
  tm = ref.VisionTransformer(32, 8, 64, 2, 4)
  state = tm.state_dict()
  del state['blocks.1.norm2.bias']
  state['blocks.1.extra.weight'] = torch.zeros(3, 3)
  src = str(tmp_path / 'odd.pth')
  torch.save({'model': state}, src)
  _run_fails(
    capsys,
    ['--src', src, '--dst', str(tmp_path / 'o'), '--num-heads', '4'],
    'missing (1): blocks.1.norm2.bias (64,)',
    'unexpected (1): blocks.1.extra.weight (3, 3)',
  )


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, capsys):
  tm = ref.VisionTransformer(32, 8, 64, 2, 4)
  state = tm.state_dict()
  state['blocks.0.mlp.fc2.weight'] = torch.zeros(64, 100)
  src = str(tmp_path / 'bad_shape.pth')
  torch.save({'model': state}, src)
  _run_fails(
    capsys,
    ['--src', src, '--dst', str(tmp_path / 'o'), '--num-heads', '4'],
    'blocks.0.mlp.fc2.weight: checkpoint (64, 100) vs model (64, 256)',
  )
  assert _leftovers(tmp_path) == ['bad_shape.pth']


def test_existing_destination_needs_overwrite(tmp_path, capsys, mae_ckpt):
  dst = tmp_path / 'out'
  dst.mkdir()
  (dst / 'precious.txt').write_text('keep me')
  _run_fails(capsys, ['--src', mae_ckpt, '--dst', str(dst), '--num-heads', '4'], '--overwrite')
  assert (dst / 'precious.txt').read_text() == 'keep me'
  assert cli(['--src', mae_ckpt, '--dst', str(dst), '--num-heads', '4', '--overwrite']) == 0
  assert sorted(os.listdir(dst)) == ['metadata.json', 'params']
  assert _leftovers(tmp_path) == ['out']  # no temporary directories left behind


def test_export_refuses_existing_file(tmp_path, capsys, mae_ckpt):
  flax_dir = str(tmp_path / 'f')
  assert cli(['--src', mae_ckpt, '--dst', flax_dir, '--num-heads', '4']) == 0
  out = tmp_path / 'back.pth'
  out.write_bytes(b'old')
  _run_fails(capsys, ['--src', flax_dir, '--dst', str(out)], '--overwrite')
  assert out.read_bytes() == b'old'


def test_export_from_a_plain_directory(tmp_path, capsys):
  d = tmp_path / 'not_converted'
  d.mkdir()
  _run_fails(capsys, ['--src', str(d), '--dst', str(tmp_path / 'x.pth')], 'metadata.json')


def test_variant_disagreeing_with_weights(tmp_path, capsys, mae_ckpt):
  _run_fails(
    capsys, ['--src', mae_ckpt, '--dst', str(tmp_path / 'o'), '--variant', 'B/16'], 'width 768'
  )


def test_unknown_width_needs_num_heads(tmp_path, capsys, mae_ckpt):
  _run_fails(capsys, ['--src', mae_ckpt, '--dst', str(tmp_path / 'o')], '--num-heads')


def test_forced_format_that_does_not_fit(tmp_path, capsys, mae_ckpt):
  _run_fails(
    capsys, ['--src', mae_ckpt, '--dst', str(tmp_path / 'o'), '--format', 'mae_full'], 'decoder'
  )
  _run_fails(
    capsys, ['--src', mae_ckpt, '--dst', str(tmp_path / 'o'), '--format', 'mocov3'], 'MoCo v3'
  )


def test_bad_image_size(tmp_path, capsys, mae_ckpt):
  _run_fails(
    capsys,
    ['--src', mae_ckpt, '--dst', str(tmp_path / 'o'), '--num-heads', '4', '--image-size', '50'],
    'multiple of the patch size 8',
  )


def test_legacy_torch_file(tmp_path, capsys):
  src = str(tmp_path / 'legacy.pth')
  torch.save({'a': torch.zeros(2)}, src, _use_new_zipfile_serialization=False)
  _run_fails(capsys, ['--src', src, '--dst', str(tmp_path / 'o')], 'legacy')


# --- malicious pickles -----------------------------------------------------------------------------


class _Evil:
  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def _zip_with_pickle(path: str, payload: bytes) -> None:
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', payload)
    zf.writestr('archive/version', '3\n')


@pytest.mark.parametrize('how', ['torch.save', 'raw_eval', 'raw_subprocess'])
def test_malicious_pickle_does_not_run(tmp_path, capsys, how):
  marker = tmp_path / 'pwned'
  src = str(tmp_path / 'evil.pth')
  if how == 'torch.save':
    # A real state dict with a payload riding along, saved by torch itself.
    torch.save({'model': {'cls_token': torch.zeros(1, 1, 8)}, 'x': _Evil(str(marker))}, src)
    needle = 'system'
  elif how == 'raw_eval':
    code = f'open({str(marker)!r}, "w")'.encode()
    payload = b'\x80\x02cbuiltins\neval\n(X' + struct.pack('<I', len(code)) + code + b'tR.'
    _zip_with_pickle(src, payload)
    needle = 'builtins.eval'
  else:
    payload = b'\x80\x02csubprocess\nPopen\n(X\x05\x00\x00\x00touch\x85tR.'
    _zip_with_pickle(src, payload)
    needle = 'subprocess.Popen'
  err = _run_fails(capsys, ['--src', src, '--dst', str(tmp_path / 'o')], needle, 'allow-list')
  assert 'malicious' in err
  assert not marker.exists()
  assert not (tmp_path / 'o').exists()


def test_random_byte_corruptions_never_crash(tmp_path):
  """Every corruption gives either a clean ConvertError or exactly the original tensors."""
  torch.manual_seed(0)
  tm = ref.VisionTransformer(16, 8, 32, 1, 2)
  src = ref.save_mae(tm, str(tmp_path / 'small.pth'), training_state=True)
  data = bytearray(open(src, 'rb').read())
  original = torch_format.load(src)['model']
  rng = np.random.RandomState(0)
  outcomes = collections.Counter()
  for trial in range(150):
    corrupt = bytearray(data)
    for pos in rng.randint(0, len(data), size=rng.randint(1, 4)):
      corrupt[pos] = rng.randint(256)
    if trial % 10 == 0:  # also truncations at random points
      corrupt = corrupt[: rng.randint(len(data))]
    path = tmp_path / 'c.pth'
    path.write_bytes(bytes(corrupt))
    try:
      loaded = torch_format.load(path)['model']
    except ConvertError as e:
      assert '\n' not in str(e)
      outcomes['error'] += 1
      continue
    assert set(loaded) == set(original)
    for k in original:
      np.testing.assert_array_equal(loaded[k], original[k])
    outcomes['intact'] += 1
  assert outcomes['error'] > 50, outcomes


def test_reader_needs_no_torch_and_rejects_out_of_bounds_views(tmp_path):
  """A record pointing outside its storage is refused (no out-of-bounds read)."""
  src = str(tmp_path / 'oob.pth')
  torch.save({'a': torch.zeros(4)}, src)
  with zipfile.ZipFile(src) as zf:
    names = zf.namelist()
    pkl = next(n for n in names if n.endswith('data.pkl'))
    files = {n: zf.read(n) for n in names}
  # size (4,) -> (4000,): same pickle length, so patch the BININT1 4 of the size tuple.
  data = files[pkl]
  buf = io.BytesIO()
  patched = data.replace(b'K\x04\x85', b'M\xa0\x0f\x85', 1)
  assert patched != data
  files[pkl] = patched
  with zipfile.ZipFile(buf, 'w') as zf:
    for n, b in files.items():
      zf.writestr(n, b)
  (tmp_path / 'oob2.pth').write_bytes(buf.getvalue())
  with pytest.raises(ConvertError, match='overruns its storage'):
    torch_format.load(tmp_path / 'oob2.pth')
