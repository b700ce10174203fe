"""The ViT on its own: variants, subset encoding, position embeddings, dtypes, drop path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma_jax.models import posemb, vit


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _tiny(**kw) -> vit.ViT:
  return vit.ViT(**{**vit.decode_variant('mu/8').kwargs(), 'image_size': 32, **kw})


@pytest.mark.parametrize(
  'variant,num_params',
  [
    # timm's published counts without the 1000-class head (e.g. ViT-B/16: 86,567,656 - 769,000).
    ('B/16', 85_798_656),
    ('L/16', 303_301_632),
    ('S/16', 21_665_664),
  ],
)
def test_parameter_counts_match_timm(variant, num_params):
  model = vit.ViT(**vit.decode_variant(variant).kwargs())
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert _count(shapes) == num_params


def test_variants_decode():
  assert vit.decode_variant('H/14') == vit.ViTSpec(1280, 32, 16, 5120, 14)
  assert vit.decode_variant('S12/16').num_heads == 12
  assert vit.decode_variant('Ti/16').width == 192
  assert vit.name_variant(768, 12, 12, 16) == 'B/16'
  assert vit.name_variant(100, 1, 1, 16) is None
  for bad in ('B', 'X/16', 'B/x', 'b/16'):
    with pytest.raises(ValueError, match='unknown ViT variant'):
      vit.decode_variant(bad)


def test_h14_token_count():
  model = vit.ViT(**vit.decode_variant('H/14').kwargs())
  out = jax.eval_shape(model.init_with_output, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  tokens, aux = out[0]
  assert tokens.shape == (1, 257, 1280)
  assert len([k for k in aux if k.startswith('block_')]) == 32


def test_subset_encoding_equals_full_when_all_visible_and_is_permutation_equivariant():
  model = _tiny()
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  params = model.init(jax.random.key(0), x)
  full, _ = model.apply(params, x)
  ident = jnp.tile(jnp.arange(16)[None], (2, 1))
  same, _ = model.apply(params, x, ident)
  np.testing.assert_allclose(same, full, atol=1e-6)
  perm = jnp.stack([jax.random.permutation(jax.random.key(i), 16) for i in range(2)])
  permuted, _ = model.apply(params, x, perm)
  np.testing.assert_allclose(permuted[:, 0], full[:, 0], atol=1e-5)  # CLS unchanged
  expected = jnp.take_along_axis(full[:, 1:], perm[..., None], axis=1)
  np.testing.assert_allclose(permuted[:, 1:], expected, atol=1e-5)


def test_subset_tokens_depend_only_on_visible_patches():
  model = _tiny()
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  params = model.init(jax.random.key(0), x)
  keep = jnp.array([[0, 5, 15]])
  a, _ = model.apply(params, x, keep)
  # Change a patch that is not visible (patch 1 = rows 0-7, cols 8-15): no effect.
  b, _ = model.apply(params, x.at[:, :8, 8:16].set(9.0), keep)
  np.testing.assert_array_equal(a, b)
  c, _ = model.apply(params, x.at[:, :8, :8].set(9.0), keep)  # patch 0 is visible
  assert not np.allclose(a, c)
  assert a.shape == (1, 4, 64)


def test_intermediates_and_heads():
  model = _tiny(num_classes=5)
  x = jnp.ones((2, 32, 32, 3))
  params = model.init(jax.random.key(0), x)
  logits, aux = model.apply(params, x)
  assert logits.shape == (2, 5)
  assert {f'block_{i}' for i in range(2)} <= set(aux)
  assert aux['encoded'].shape == (2, 17, 64) and aux['pre_logits'].shape == (2, 64)
  gap = _tiny(num_classes=5, pool='gap')
  gparams = gap.init(jax.random.key(0), x)['params']
  assert 'fc_norm' in gparams and 'norm' not in gparams


def test_wrong_image_size_is_a_clear_error():
  model = _tiny()
  with pytest.raises(ValueError, match='--image-size'):
    model.init(jax.random.key(0), jnp.zeros((1, 48, 48, 3)))


def test_drop_path_only_in_training():
  model = _tiny(drop_path=0.5)
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  params = model.init(jax.random.key(0), x)
  a, _ = model.apply(params, x)
  b, _ = model.apply(params, x)
  np.testing.assert_array_equal(a, b)
  c, _ = model.apply(params, x, train=True, rngs={'dropout': jax.random.key(2)})
  d, _ = model.apply(params, x, train=True, rngs={'dropout': jax.random.key(2)})
  np.testing.assert_array_equal(c, d)
  assert not np.allclose(a, c)


def test_patchify_round_trip():
  x = jax.random.normal(jax.random.key(0), (2, 32, 48, 3))
  p = vit.patchify(x, 8)
  assert p.shape == (2, 24, 192)
  np.testing.assert_array_equal(vit.unpatchify(p, 8, (4, 6)), x)
  # Patch 1 is rows 0-7, columns 8-15, flattened (row, col, channel).
  np.testing.assert_array_equal(p[:, 1], x[:, :8, 8:16].reshape(2, -1))


@pytest.mark.parametrize('layout', ['mae', 'moco'])
def test_sincos_layouts(layout):
  fn = posemb.sincos_2d_mae if layout == 'mae' else posemb.sincos_2d_moco
  table = fn(32, 4, cls_token=True)
  assert table.shape == (17, 32)
  np.testing.assert_array_equal(table[0], 0)
  grid = table[1:].reshape(4, 4, 32)  # [row, col, D]
  col_half, row_half = (grid[..., :16], grid[..., 16:])
  if layout == 'moco':
    col_half, row_half = row_half, col_half
  # The column half is the same along every column (independent of the row), and vice versa.
  np.testing.assert_allclose(col_half, np.broadcast_to(col_half[:1], col_half.shape))
  np.testing.assert_allclose(row_half, np.broadcast_to(row_half[:, :1], row_half.shape))
  # sin(0) = 0 and cos(0) = 1 at position 0 of each half.
  np.testing.assert_allclose(grid[0, 0, :8], 0, atol=1e-7)
  np.testing.assert_allclose(grid[0, 0, 8:16], 1, atol=1e-7)


def test_resample_identity_and_constant():
  table = posemb.sincos_2d_mae(16, 4)[None]
  np.testing.assert_array_equal(posemb.resample_grid(table, 4), table)
  const = np.ones((1, 17, 4), np.float32)
  np.testing.assert_allclose(posemb.resample_grid(const, 7), np.ones((1, 50, 4)), atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
  model = _tiny(dtype=jnp.bfloat16)
  x = jnp.ones((1, 32, 32, 3))
  params = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  out, _ = model.apply(params, x)
  assert out.dtype == jnp.bfloat16


# --- remat and scan over blocks ------------------------------------------------------------------

_MEMORY_OPTIONS = [
  {'remat': 'block'},
  {'scan_blocks': True},
  {'scan_blocks': True, 'remat': 'block'},
  {'scan_blocks': True, 'remat': 'block', 'remat_policy': 'dots_with_no_batch_dims_saveable'},
]


def _canonical_and_variant(options, **kw):
  """(plain model, its variables, model with ``options``, the same variables in its layout)."""
  plain = _tiny(**kw)
  x = jnp.zeros((1, 32, 32, 3))
  variables = plain.init(jax.random.key(0), x)
  other = _tiny(**kw, **options)
  converted = vit.stack_block_params(variables) if options.get('scan_blocks') else variables
  expected = jax.eval_shape(other.init, jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, converted) == jax.tree.map(jnp.shape, expected)
  return plain, variables, other, converted


@pytest.mark.parametrize('options', _MEMORY_OPTIONS, ids=lambda o: ','.join(map(str, o.values())))
@pytest.mark.parametrize('subset', [False, True])
def test_remat_and_scan_match_the_plain_vit(options, subset):
  plain, variables, other, converted = _canonical_and_variant(options, num_classes=0)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  idx = jnp.array([[0, 3, 7, 12], [15, 1, 2, 9]]) if subset else None
  out, aux = plain.apply(variables, x, idx)
  out2, aux2 = jax.jit(other.apply)(converted, x, idx)
  assert set(aux2) == set(aux)
  np.testing.assert_allclose(out2, out, atol=1e-5)
  for k in aux:
    np.testing.assert_allclose(aux2[k], aux[k], atol=1e-5, err_msg=k)

  def loss(model, v):
    o, a = model.apply(v, x, idx)
    return jnp.sum(o**2) + jnp.sum(jnp.sin(a['block_0']))  # an intermediate carries gradient

  g = jax.grad(functools.partial(loss, plain))(variables)
  g2 = jax.jit(jax.grad(functools.partial(loss, other)))(converted)
  if options.get('scan_blocks'):
    g2 = vit.unstack_block_params(g2)
  # Gradients reach ~50 here: float32 summation order differs, so the tolerance is relative.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4), g, g2)


def test_block_param_round_trip_is_the_identity():
  model = _tiny(num_classes=3, pool='gap')
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  stacked = vit.stack_block_params(variables, depth=2)
  assert 'blocks_0' not in stacked['params'] and stacked['params']['blocks']['norm1'][
    'scale'
  ].shape == (2, 64)
  back = vit.unstack_block_params(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, back, variables)
  # The inner params dict works as well, and the wrong depth is one clear error.
  inner = vit.unstack_block_params(vit.stack_block_params(variables['params']))
  jax.tree.map(np.testing.assert_array_equal, inner, variables['params'])
  on_host = vit.stack_block_params(jax.tree.map(np.asarray, variables))  # a checkpoint stays NumPy
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(on_host))
  with pytest.raises(ValueError, match='expected blocks_0 ... blocks_3, found 2 blocks'):
    vit.stack_block_params(variables, depth=4)
  with pytest.raises(ValueError, match="remat must be 'none' or 'block'"):
    _tiny(remat='all').init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize('scan', [False, True])
def test_drop_path_rates_per_block_with_scan_and_remat(scan):
  # drop_path=1 over 2 blocks: rates (0, 1), so block 1 drops both residual branches.
  model = _tiny(drop_path=1.0, scan_blocks=scan, remat='block')
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  rngs = {'dropout': jax.random.key(2)}
  out, aux = jax.jit(lambda v: model.apply(v, x, train=True, rngs=rngs))(variables)
  np.testing.assert_array_equal(aux['block_1'], aux['block_0'])
  evaluated, eval_aux = model.apply(variables, x)
  np.testing.assert_allclose(aux['block_0'], eval_aux['block_0'], atol=1e-6)  # rate 0
  assert not np.allclose(out, evaluated)
  # Same key, same masks; the gradient flows through remat + scan with dropout.
  again, _ = model.apply(variables, x, train=True, rngs=rngs)
  np.testing.assert_allclose(again, out, atol=1e-5)  # (jit vs eager rounding only)
  g = jax.grad(lambda v: model.apply(v, x, train=True, rngs=rngs)[0].sum())(variables)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(g))


def test_scanned_bfloat16_keeps_float32_params():
  model = _tiny(dtype=jnp.bfloat16, scan_blocks=True, remat='block')
  x = jnp.ones((1, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  out, aux = model.apply(variables, x)
  assert out.dtype == jnp.bfloat16 and aux['block_1'].dtype == jnp.bfloat16


def test_tpu_flash_attention_matches_numpy_and_the_xla_model():
  """attention_impl='flash' (the Pallas TPU kernel, run by its interpreter on the CPU; 197 tokens
  padded to 256 behind segment ids) against NumPy softmax attention, and a whole ViT against the
  same weights with XLA's attention; also under a mesh (the kernel shard_mapped over the batch)."""
  from jax.experimental.pallas import tpu as pltpu

  rng = np.random.RandomState(0)
  q, k, v = (rng.normal(size=(2, 197, 3, 16)).astype(np.float32) for _ in range(3))
  s = np.einsum('bthd,bshd->bhts', q, k) / 4.0
  p = np.exp(s - s.max(-1, keepdims=True))
  ref = np.einsum('bhts,bshd->bthd', p / p.sum(-1, keepdims=True), v)
  model = _tiny(image_size=56, patch_size=4)  # 196 patches + CLS, as a 224 px ViT-*/16
  images = jnp.asarray(rng.uniform(size=(2, 56, 56, 3)).astype(np.float32))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  plain = model.apply(variables, images)[0]
  mesh = jax.make_mesh((2,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  # Jitted, not op by op: one eager run of the interpreted model deadlocked in XLA's dispatch
  # (a futex wait in a reshape after the kernel, CI 2026-12-06).
  with pltpu.force_tpu_interpret_mode():
    got = jax.jit(vit.tpu_flash_attention)(*map(jnp.asarray, (q, k, v)))
    flash = jax.jit(model.clone(attention_impl='flash').apply)(variables, images)[0]
    with jax.set_mesh(mesh):
      sharded = jax.jit(model.clone(attention_impl='flash').apply)(variables, images)[0]
  np.testing.assert_allclose(got, ref, atol=2e-6)
  np.testing.assert_allclose(flash, plain, atol=2e-5)
  np.testing.assert_allclose(sharded, plain, atol=2e-5)
