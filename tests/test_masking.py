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
