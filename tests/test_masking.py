"""Masking: counts, coverage, independence across examples and steps, reproducibility."""

import jax
import numpy as np
import pytest

from moma_jax import masking


def test_mae_rounding():
  assert masking.num_visible(196, 0.9) == 19
  assert masking.num_visible(196, 0.75) == 49
  assert masking.num_visible(64, 0.9) == 6
  with pytest.raises(ValueError, match='mask_ratio'):
    masking.num_visible(196, 1.0)


def test_keep_idx_properties():
  key = jax.random.key(0)
  idx = np.asarray(masking.random_keep_idx(key, 512, 196, 0.9))
  assert idx.shape == (512, 19) and idx.dtype == np.int32
  assert all(len(set(row)) == 19 for row in idx)  # no patch twice
  assert idx.min() >= 0 and idx.max() < 196
  assert len({tuple(sorted(r)) for r in idx}) == 512  # a different mask per example
  # Uniform coverage: every patch kept with probability 19/196; counts over 512 examples ~ 49.6.
  counts = np.bincount(idx.ravel(), minlength=196)
  expected = 512 * 19 / 196
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 300, chi2  # df = 195: p(chi2 > 300) < 1e-5 under uniformity
  np.testing.assert_array_equal(idx, masking.random_keep_idx(key, 512, 196, 0.9))  # reproducible
  step1 = np.asarray(masking.random_keep_idx(jax.random.fold_in(key, 1), 512, 196, 0.9))
  assert (step1 != idx).any(axis=1).mean() > 0.99  # the step's key changes the masks


def test_masks_are_independent_across_the_batch_and_across_steps():
  """Two independent uniform masks of n of N patches share a hypergeometric number of patches:
  mean n^2 / N, variance n (n/N) ((N-n)/N) ((N-n)/(N-1)). Checked for neighbouring examples of a
  batch and for the same example at consecutive steps (the trainer folds the step into the key)."""
  key, b, n_patches = jax.random.key(3), 2048, 196
  step0 = np.asarray(masking.random_keep_idx(key, b, n_patches, 0.9))
  step1 = np.asarray(masking.random_keep_idx(jax.random.fold_in(key, 1), b, n_patches, 0.9))
  n = step0.shape[1]
  mean = n * n / n_patches
  var = n * (n / n_patches) * ((n_patches - n) / n_patches) * ((n_patches - n) / (n_patches - 1))

  def overlaps(a, c):
    return np.array([len(set(x) & set(y)) for x, y in zip(a, c, strict=True)])

  for what, o in (('batch', overlaps(step0[:-1], step0[1:])), ('steps', overlaps(step0, step1))):
    se = np.sqrt(var / len(o))
    assert abs(o.mean() - mean) < 5 * se, (what, o.mean(), mean)
    assert 0.8 * var < o.var() < 1.2 * var, (what, o.var(), var)
