"""Official checkpoint formats -> Flax: numerics against the PyTorch models they came from."""

from __future__ import annotations

import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import convert, torch_format
from convert.__main__ import main as cli
from moma_jax.builders import load_checkpoint
from moma_jax.models.pretrained import load_pretrained

import torch_reference as ref

TOL = 1e-5


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randn(n, size, size, 3).astype(np.float32)


def _keep_idx(n: int, num_patches: int, keep: int, seed: int = 1) -> np.ndarray:
  rng = np.random.RandomState(seed)
  return np.stack([rng.permutation(num_patches)[:keep] for _ in range(n)]).astype(np.int32)


def _torch(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(x).permute(0, 3, 1, 2)


def _compare_encoder(tm: ref.VisionTransformer, loaded, size: int, keep: int | None = None):
  """Final tokens and every block's output of Flax vs PyTorch, full and visible-subset input."""
  x = _images(2, size)
  n = (size // tm.patch) ** 2
  for idx in (None, _keep_idx(2, n, keep or max(1, n // 10))):
    with torch.no_grad():
      t_tokens, t_inter = tm.forward_encoder(
        _torch(x), None if idx is None else torch.from_numpy(idx).long()
      )
    tokens, aux = loaded.model.apply(loaded.params, x, idx)
    tokens = aux['encoded']
    np.testing.assert_allclose(np.asarray(tokens), t_tokens.numpy(), atol=TOL, rtol=0)
    for i, t in enumerate(t_inter):
      np.testing.assert_allclose(np.asarray(aux[f'block_{i}']), t.numpy(), atol=TOL, rtol=0)


def _convert(tmp_path, src, *args) -> str:
  dst = str(tmp_path / 'flax')
  assert cli(['--src', src, '--dst', dst, *args]) == 0
  return dst


@pytest.mark.parametrize(
  'dim,depth,heads,patch,size',
  [(64, 1, 2, 8, 32), (96, 3, 3, 16, 64), (128, 2, 8, 14, 56)],
)
def test_mae_pretrain_matches_torch(tmp_path, dim, depth, heads, patch, size):
  torch.manual_seed(0)
  tm = ref.VisionTransformer(size, patch, dim, depth, heads).eval()
  src = ref.save_mae(tm, str(tmp_path / 'mae_pretrain.pth'))
  dst = _convert(tmp_path, src, '--num-heads', str(heads))
  loaded = load_pretrained(dst)
  assert loaded.metadata['format'] == 'mae_pretrain'
  assert loaded.model.depth == depth and loaded.model.patch_size == patch
  _compare_encoder(tm, loaded, size)


def test_vit_b16_shaped_matches_torch(tmp_path):
  torch.manual_seed(0)
  tm = ref.VisionTransformer(224, 16, 768, 12, 12).eval()
  src = ref.save_mae(tm, str(tmp_path / 'mae_pretrain_vit_base.pth'))
  loaded = load_pretrained(_convert(tmp_path, src))
  assert loaded.metadata['variant'] == 'B/16' and loaded.metadata['image_size'] == 224
  _compare_encoder(tm, loaded, 224, keep=19)  # 90% masking keeps int(196 * 0.1) = 19


def test_mae_full_decoder_matches_torch(tmp_path):
  torch.manual_seed(0)
  tm = ref.VisionTransformer(32, 8, 64, 2, 4, decoder_dim=32, decoder_depth=2, decoder_heads=16)
  tm.eval()
  src = ref.save_mae(tm, str(tmp_path / 'mae_visualize_vit_tiny.pth'))
  loaded = load_pretrained(_convert(tmp_path, src, '--num-heads', '4'))
  assert loaded.metadata['format'] == 'mae_full'
  _compare_encoder(tm, loaded, 32)
  x, idx = _images(2, 32), _keep_idx(2, 16, 4)
  tokens, _ = loaded.model.apply(loaded.params, x, idx)
  dec = loaded.heads['decoder']
  pred = dec.module.apply(dec.variables, tokens, idx)
  with torch.no_grad():
    t_tokens, _ = tm.forward_encoder(_torch(x), torch.from_numpy(idx).long())
    t_pred = tm.forward_decoder(t_tokens, torch.from_numpy(idx).long())
  assert pred.shape == (2, 16, 8 * 8 * 3)
  np.testing.assert_allclose(np.asarray(pred), t_pred.numpy(), atol=TOL, rtol=0)


def test_mae_finetuned_logits_match_torch(tmp_path):
  torch.manual_seed(0)
  tm = ref.VisionTransformer(32, 8, 64, 2, 4, num_classes=10, global_pool=True).eval()
  src = ref.save_mae(tm, str(tmp_path / 'mae_finetuned_vit_tiny.pth'))
  loaded = load_pretrained(_convert(tmp_path, src, '--num-heads', '4'))
  assert loaded.metadata['format'] == 'mae_finetuned'
  assert loaded.model.pool == 'gap' and loaded.model.num_classes == 10
  x = _images(3, 32)
  logits, _ = loaded.model.apply(loaded.params, x)
  with torch.no_grad():
    t_logits = tm(_torch(x))
  np.testing.assert_allclose(np.asarray(logits), t_logits.numpy(), atol=TOL, rtol=0)


def test_timm_classifier_and_safetensors(tmp_path):
  torch.manual_seed(0)
  tm = ref.VisionTransformer(32, 8, 192, 2, 3, num_classes=7).eval()
  for name in ('deit_tiny.pth', 'vit_tiny.safetensors'):
    if name.endswith('.safetensors'):
      src = ref.save_safetensors(tm, str(tmp_path / name))
    else:
      src = str(tmp_path / name)
      torch.save(tm.state_dict(), src)  # a bare state dict, as timm saves
    dst = str(tmp_path / f'flax_{name}')
    assert cli(['--src', src, '--dst', dst]) == 0
    loaded = load_pretrained(dst)
    assert loaded.metadata['format'] == 'timm'
    assert loaded.model.num_heads == 3  # width 192 -> ViT-Ti
    x = _images(2, 32)
    logits, _ = loaded.model.apply(loaded.params, x)
    with torch.no_grad():
      t_logits = tm(_torch(x))
    np.testing.assert_allclose(np.asarray(logits), t_logits.numpy(), atol=TOL, rtol=0)
    _compare_encoder(tm, loaded, 32)


@pytest.mark.parametrize('arch,dim,heads', [('vit_small', 384, 12), ('vit_base', 768, 12)])
def test_mocov3_encoder_and_heads_match_torch(tmp_path, arch, dim, heads):
  torch.manual_seed(0)
  tm = ref.VisionTransformer(32, 16, dim, 1, heads).eval()
  src = str(tmp_path / 'vit-s-300ep.pth.tar')
  mods = ref.save_mocov3(tm, src, arch=arch)
  dst = _convert(tmp_path, src)
  loaded = load_pretrained(dst)
  meta = loaded.metadata
  assert meta['format'] == 'mocov3' and meta['source']['arch'] == arch
  assert loaded.model.num_heads == heads  # MoCo v3 vit_small: 12 heads, from the arch entry
  assert set(loaded.heads) == {'projector', 'predictor'}  # momentum encoder not kept by default
  _compare_encoder(tm, loaded, 32)
  x = _images(4, 32)
  tokens, _ = loaded.model.apply(loaded.params, x)
  proj, pred = loaded.heads['projector'], loaded.heads['predictor']
  z = proj.module.apply(proj.variables, tokens[:, 0])
  q = pred.module.apply(pred.variables, z)
  with torch.no_grad():
    for m in mods.values():
      m.eval()
    t_z = mods['projector'](tm.forward_encoder(_torch(x))[0][:, 0])
    t_q = mods['predictor'](t_z)
  np.testing.assert_allclose(np.asarray(z), t_z.numpy(), atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(q), t_q.numpy(), atol=1e-4, rtol=1e-5)


def test_mocov3_momentum_encoder_on_request(tmp_path):
  torch.manual_seed(0)
  tm = ref.VisionTransformer(32, 16, 64, 1, 4).eval()
  src = str(tmp_path / 'moco.pth.tar')
  ref.save_mocov3(tm, src, arch='custom')
  loaded = load_pretrained(_convert(tmp_path, src, '--num-heads', '4', '--momentum'))
  assert {'momentum_encoder', 'momentum_projector'} <= set(loaded.heads)
  mom = loaded.heads['momentum_encoder'].variables['params']
  np.testing.assert_array_equal(
    np.asarray(mom['cls_token']), np.asarray(loaded.params['params']['cls_token']) + 1.0
  )


def test_mae_training_checkpoint_with_args_and_optimizer(tmp_path):
  torch.manual_seed(0)
  tm = ref.VisionTransformer(32, 8, 64, 1, 4).eval()
  src = ref.save_mae(tm, str(tmp_path / 'checkpoint-399.pth'), training_state=True)
  loaded = load_pretrained(_convert(tmp_path, src, '--num-heads', '4'))
  assert loaded.metadata['source']['epoch'] == 399
  _compare_encoder(tm, loaded, 32)


def test_metadata_records_source_and_normalisation(tmp_path):
  tm = ref.VisionTransformer(32, 8, 64, 1, 4)
  src = ref.save_mae(tm, str(tmp_path / 'm.pth'))
  dst = _convert(tmp_path, src, '--num-heads', '4')
  with open(os.path.join(dst, 'metadata.json')) as f:
    meta = json.load(f)
  assert meta['source']['file'] == 'm.pth'
  assert meta['source']['sha256'] == convert.sha256(src)
  assert meta['mean'] == [0.485, 0.456, 0.406] and meta['std'] == [0.229, 0.224, 0.225]
  assert meta['components']['encoder']['kwargs']['num_heads'] == 4


def test_round_trip_torch_flax_torch_is_identical(tmp_path):
  torch.manual_seed(0)
  cases = {
    'pretrain': ref.VisionTransformer(32, 8, 64, 2, 4),
    'full': ref.VisionTransformer(32, 8, 64, 2, 4, decoder_dim=32, decoder_depth=1),
    'finetuned': ref.VisionTransformer(32, 8, 64, 2, 4, num_classes=5, global_pool=True),
  }
  for name, tm in cases.items():
    src = ref.save_mae(tm, str(tmp_path / f'{name}.pth'))
    flax_dir = str(tmp_path / f'{name}_flax')
    out = str(tmp_path / f'{name}_back.pth')
    assert cli(['--src', src, '--dst', flax_dir, '--num-heads', '4']) == 0
    assert cli(['--src', flax_dir, '--dst', out]) == 0
    back = torch.load(out, weights_only=True)['model']
    orig = tm.state_dict()
    assert set(back) == set(orig), name
    for k in orig:
      assert back[k].dtype == orig[k].dtype and torch.equal(back[k], orig[k]), k
    # The exported file loads strictly into the PyTorch model.
    tm.load_state_dict(back, strict=True)


def test_export_safetensors(tmp_path):
  from safetensors.torch import load_file

  tm = ref.VisionTransformer(32, 8, 64, 1, 4)
  flax_dir = _convert(tmp_path, ref.save_mae(tm, str(tmp_path / 'm.pth')), '--num-heads', '4')
  out = str(tmp_path / 'm.safetensors')
  assert cli(['--src', flax_dir, '--dst', out]) == 0
  back = load_file(out)
  for k, v in tm.state_dict().items():
    assert torch.equal(back[k], v), k
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask  # as any other file the user writes
  # Our own file converts back without --num-heads (4 is not what width 64 would default to), and
  # serves as a teacher checkpoint directly.
  assert cli(['--src', out, '--dst', str(tmp_path / 'again')]) == 0
  again = load_pretrained(str(tmp_path / 'again'))
  assert again.model.num_heads == 4
  assert load_checkpoint(out).model.num_heads == 4


def test_position_embedding_resampled_for_new_image_size(tmp_path):
  torch.manual_seed(0)
  tm = ref.VisionTransformer(32, 8, 64, 1, 4)
  src = ref.save_mae(tm, str(tmp_path / 'm.pth'))
  loaded = load_pretrained(_convert(tmp_path, src, '--num-heads', '4', '--image-size', '48'))
  assert loaded.model.image_size == 48
  pe = np.asarray(loaded.params['params']['pos_embed'])
  assert pe.shape == (1, 1 + 36, 64)
  # CLS row kept apart, grid as timm resamples it (torch bicubic, align_corners=False).
  np.testing.assert_array_equal(pe[:, 0], tm.pos_embed[:, 0].detach().numpy())
  grid = tm.pos_embed[:, 1:].detach().reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
  t = torch.nn.functional.interpolate(grid, size=(6, 6), mode='bicubic', align_corners=False)
  np.testing.assert_allclose(pe[:, 1:], t.permute(0, 2, 3, 1).reshape(1, 36, 64), atol=1e-6)
  out, _ = loaded.model.apply(loaded.params, _images(1, 48))
  assert out.shape == (1, 37, 64) and np.isfinite(np.asarray(out)).all()


def test_bfloat16_compute_is_close_to_float32(tmp_path):
  tm = ref.VisionTransformer(32, 8, 64, 2, 4)
  dst = _convert(tmp_path, ref.save_mae(tm, str(tmp_path / 'm.pth')), '--num-heads', '4')
  f32 = load_pretrained(dst)
  bf16 = load_pretrained(dst, dtype=jnp.bfloat16)
  x = _images(2, 32)
  a, _ = f32.model.apply(f32.params, x)
  b, _ = bf16.model.apply(bf16.params, x)
  assert b.dtype == jnp.bfloat16
  assert jax.tree.leaves(bf16.params)[0].dtype == jnp.float32  # master weights stay float32
  err = np.abs(np.asarray(b, np.float32) - np.asarray(a)).max()
  assert 0 < err < 0.1


def test_exported_file_is_read_by_our_reader_too(tmp_path):
  tm = ref.VisionTransformer(32, 8, 64, 1, 4)
  flax_dir = _convert(tmp_path, ref.save_mae(tm, str(tmp_path / 'm.pth')), '--num-heads', '4')
  out = str(tmp_path / 'back.pth')
  assert cli(['--src', flax_dir, '--dst', out]) == 0
  state = torch_format.load(out)['model']
  for k, v in tm.state_dict().items():
    np.testing.assert_array_equal(state[k], v.numpy())


def test_written_file_is_byte_reproducible(tmp_path):
  """Same tensors, same bytes: zip members carry a fixed timestamp, so a regenerated checkpoint
  (teachers/) has the same sha256, and torch reads it."""
  obj = {'model': {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}, 'epoch': 3}
  a, b = tmp_path / 'a.pth', tmp_path / 'b.pth'
  torch_format.save(obj, a)
  torch_format.save(obj, b)
  assert a.read_bytes() == b.read_bytes()
  assert {i.date_time for i in zipfile.ZipFile(b).infolist()} == {(1980, 1, 1, 0, 0, 0)}
  np.testing.assert_array_equal(
    torch.load(b, weights_only=True)['model']['w'].numpy(), obj['model']['w']
  )


def test_second_reference_huggingface_vit(tmp_path):
  """An independent implementation (transformers' ViTModel, separate q/k/v) agrees as well."""
  import transformers

  cfg = transformers.ViTConfig(
    hidden_size=96,
    num_hidden_layers=3,
    num_attention_heads=6,
    intermediate_size=384,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-6,
    hidden_act='gelu',
  )
  torch.manual_seed(0)
  hf = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.normal_(1.0 if name.endswith('weight') and p.ndim == 1 else 0.0, 0.05)
  sd = hf.state_dict()
  timm = {
    'cls_token': sd['embeddings.cls_token'],
    'pos_embed': sd['embeddings.position_embeddings'],
    'patch_embed.proj.weight': sd['embeddings.patch_embeddings.projection.weight'],
    'patch_embed.proj.bias': sd['embeddings.patch_embeddings.projection.bias'],
    'norm.weight': sd['layernorm.weight'],
    'norm.bias': sd['layernorm.bias'],
  }
  for i in range(cfg.num_hidden_layers):
    h = f'layers.{i}.'
    for part in ('weight', 'bias'):
      timm[f'blocks.{i}.attn.qkv.{part}'] = torch.cat(
        [sd[f'{h}attention.{x}_proj.{part}'] for x in 'qkv']
      )
      timm[f'blocks.{i}.attn.proj.{part}'] = sd[f'{h}attention.o_proj.{part}']
      timm[f'blocks.{i}.norm1.{part}'] = sd[f'{h}layernorm_before.{part}']
      timm[f'blocks.{i}.norm2.{part}'] = sd[f'{h}layernorm_after.{part}']
      timm[f'blocks.{i}.mlp.fc1.{part}'] = sd[f'{h}mlp.fc1.{part}']
      timm[f'blocks.{i}.mlp.fc2.{part}'] = sd[f'{h}mlp.fc2.{part}']
  src = str(tmp_path / 'from_hf.pth')
  torch.save({'model': timm}, src)
  loaded = load_pretrained(_convert(tmp_path, src, '--num-heads', '6'))
  x = _images(2, 32)
  tokens, _ = loaded.model.apply(loaded.params, x)
  with torch.no_grad():
    expected = hf(pixel_values=_torch(x)).last_hidden_state
  np.testing.assert_allclose(np.asarray(tokens), expected.numpy(), atol=TOL, rtol=0)


def test_a_plain_safetensors_takes_its_head_count_from_the_config_variant(tmp_path):
  """A timm-style safetensors of an unusual width has no head count: given as a checkpoint to the
  trainer, the config's variant supplies it when the shapes agree; otherwise one line says how to
  convert it, with the converter's own flag spelled as the converter takes it."""
  src = ref.save_safetensors(
    ref.VisionTransformer(32, 4, 64, 2, 2), str(tmp_path / 'x.safetensors')
  )
  assert load_checkpoint(src, variant='mu/4').model.num_heads == 2
  for variant in ('B/16', None):
    with pytest.raises(
      ValueError, match=r'python -m convert --src .* --num-heads N\) and give DIR'
    ):
      load_checkpoint(src, variant=variant)


def test_a_training_workdir_reads_as_its_export(tmp_path):
  """moma-knn --checkpoint WORKDIR, a teacher / student checkpoint = a previous run's workdir: the
  run's exported model (WORKDIR/export/model) is what is meant."""
  src = ref.save_mae(ref.VisionTransformer(32, 8, 64, 1, 4), str(tmp_path / 'm.pth'))
  (tmp_path / 'wd' / 'export').mkdir(parents=True)
  convert.convert_checkpoint(src, str(tmp_path / 'wd' / 'export' / 'model'), num_heads=4)
  (tmp_path / 'wd' / 'checkpoints').mkdir()
  assert load_checkpoint(str(tmp_path / 'wd')).model.num_heads == 4
  with pytest.raises(FileNotFoundError, match='not a converted checkpoint directory'):
    load_checkpoint(str(tmp_path / 'wd' / 'checkpoints'))
