"""The Flax ResNet against a torchvision-layout PyTorch ResNet; conversion both ways."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from convert.__main__ import main as convert_cli
from convert.convert import convert_checkpoint, export_checkpoint
from convert.errors import ConvertError
from moma_jax.models import resnet
from moma_jax.models.pretrained import load_pretrained

import torch_resnet as tr


def _torch_out(model, x):
  model.eval()
  with torch.no_grad():
    pooled, fmap = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    logits = model.fc(pooled)
  return pooled.numpy(), fmap.permute(0, 2, 3, 1).numpy(), logits.numpy()


@pytest.mark.parametrize(
  'name,make,size,classes',
  [
    ('resnet50', lambda: tr.resnet50(num_classes=10), 64, 10),
    ('resnet_mu', lambda: tr.ResNet(tr.BasicBlock, [1, 1, 1, 1], 0, 16, True), 32, 0),
  ],
)
def test_converted_resnet_equals_torch(tmp_path, name, make, size, classes):
  torch.manual_seed(0)
  model = make().randomize()
  src = str(tmp_path / 'r.pth')
  torch.save(model.state_dict(), src)  # torchvision releases are plain state dicts
  meta = convert_checkpoint(src, str(tmp_path / 'conv'))
  assert (meta['format'], meta['variant']) == ('torchvision', name)
  loaded = load_pretrained(str(tmp_path / 'conv'))
  assert isinstance(loaded.model, resnet.ResNet) and loaded.model.num_classes == classes
  x = np.random.RandomState(1).randn(2, size, size, 3).astype(np.float32)
  out, aux = loaded.model.apply(loaded.params, x)
  pooled, fmap, logits = _torch_out(model, x)
  np.testing.assert_allclose(aux['pre_logits'], pooled, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux['feature_map'], fmap, rtol=1e-5, atol=1e-5)
  if classes:
    np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-5)
  # ... and back: the exported state dict is the original one, key for key.
  back = str(tmp_path / 'back.pth')
  assert convert_cli(['--src', str(tmp_path / 'conv'), '--dst', back]) == 0
  state = torch.load(back, weights_only=True)
  ref = model.state_dict()
  assert set(state) == set(ref)
  for k, v in ref.items():
    if not k.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(state[k].numpy(), v.numpy(), err_msg=k)


def test_train_mode_batchnorm_matches_torch():
  torch.manual_seed(0)
  model = tr.ResNet(tr.Bottleneck, [1, 1, 1, 1], 0, 8, True).randomize()
  from convert import layouts

  variables = layouts.torch_to_flax({k: v.numpy() for k, v in model.state_dict().items()})
  flax_model = resnet.ResNet(**resnet.decode_variant('resnet_milli'))
  flax_model = flax_model.clone(width=8)
  x = np.random.RandomState(2).randn(4, 16, 16, 3).astype(np.float32)
  (pooled, _), new = flax_model.apply(variables, x, train=True, mutable=['batch_stats'])
  model.train()
  with torch.no_grad():
    ref, _ = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
  np.testing.assert_allclose(pooled, ref.numpy(), rtol=1e-4, atol=1e-5)
  ref_stats = layouts.torch_to_flax({k: v.numpy() for k, v in model.state_dict().items()})
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    new['batch_stats'],
    ref_stats['batch_stats'],
  )


def test_flops_and_variants():
  m = resnet.ResNet(**resnet.decode_variant('resnet50'))
  assert m.out_dim == 2048 and m.stride == 32
  assert 8.0e9 < resnet.forward_flops(m, 224) < 8.4e9  # the usual 4.1 GMACs
  assert resnet.name_variant('bottleneck', [3, 4, 6, 3], 64, False) == 'resnet50'
  with pytest.raises(ValueError, match='unknown ResNet variant'):
    resnet.decode_variant('resnet51')


def test_resnet_bad_conversion_options(tmp_path):
  model = tr.ResNet(tr.BasicBlock, [1, 1, 1, 1], 0, 8, True)
  src = str(tmp_path / 'r.pth')
  torch.save(model.state_dict(), src)
  with pytest.raises(ConvertError, match='holds a ResNet: --variant'):
    convert_checkpoint(src, str(tmp_path / 'c'), variant='S/16')
  convert_checkpoint(src, str(tmp_path / 'c'))
  with pytest.raises(ConvertError, match='export it as torchvision or dino'):
    export_checkpoint(str(tmp_path / 'c'), str(tmp_path / 'x.pth'), fmt='mae')
