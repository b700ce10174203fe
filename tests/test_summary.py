"""The final summary block (moma_jax/summary.py): k-NN and linear-probe columns, every row."""

from __future__ import annotations

from moma_jax import summary

FINAL = {
  'knn/model/top1': 0.119, 'knn/model/linear': 0.25,
  'knn/model_before/top1': 0.112, 'knn/model_before/linear': 0.221,
  'knn/teacher_moco/top1': 0.093, 'knn/teacher_moco/linear': 0.172,
  'knn/random_init/top1': 0.131, 'knn/random_init/linear': 0.228,
  'knn/raw_pixels/top1': 0.386, 'knn/raw_pixels/linear': 0.147,
  'knn/teacher_cnn/top1': 0.5,  # another feature tag without a linear probe: '-'
}  # fmt: skip


def _block(final, objective='moma'):
  return summary.final_block(
    name='moco_to_mae', objective=objective, step=300, total_steps=300, seconds=28.4,
    dataset='digits_m/test', num_classes=10, final=final,
  )  # fmt: skip


def test_knn_and_linear_columns():
  assert _block({k: v for k, v in FINAL.items() if k != 'knn/teacher_cnn/top1'}) == [
    'moco_to_mae: 300/300 steps in 28 s (moma)',
    'k-NN (k 20, T 0.07) and linear-probe top-1 on digits_m/test:',
    '                                       k-NN          linear',
    '  student (before -> after)  11.2% -> 11.9%  22.1% -> 25.0%',
    '  teacher moco                         9.3%           17.2%',
    '  random-init student                 13.1%           22.8%',
    '  raw pixels                          38.6%           14.7%',
    '  chance                              10.0%           10.0%',
  ]


def test_missing_cells_and_no_before():
  final = {k: v for k, v in FINAL.items() if 'before' not in k}
  lines = _block(final, objective='mae')
  assert lines[2:5] == [
    '                       k-NN  linear',
    '  model               11.9%   25.0%',
    '  teacher cnn         50.0%       -',
  ]
  # Every row has both columns, their numbers right-aligned under the header.
  for line in lines[3:]:
    assert line.endswith('%') or line.endswith('-')
    assert len(line) == len(lines[2])


def test_knn_only_when_no_linear_probe_ran():
  final = {k: v for k, v in FINAL.items() if k.endswith('/top1') and 'cnn' not in k}
  assert _block(final)[1:4] == [
    'k-NN (k 20, T 0.07) top-1 on digits_m/test:',
    '                                       k-NN',
    '  student (before -> after)  11.2% -> 11.9%',
  ]
  assert _block(final)[-1] == '  chance                              10.0%'


def test_classification_line_unchanged():
  lines = _block({'eval/top1': 0.5, 'eval/top5': 0.9}, objective='classification')
  assert lines[1:] == ['classification on digits_m/test: top-1 50.0%, top-5 90.0%, chance 10.0%']


def test_a_resumed_run_says_what_it_ran_and_every_run_where_its_outputs_are():
  lines = summary.final_block(
    name='moco_to_mae', objective='moma', step=300, total_steps=300, seconds=38.2,
    dataset='digits/test', num_classes=10, final={}, first_step=138, workdir='/tmp/wd',
    exported=True,
  )  # fmt: skip
  assert lines[0] == 'moco_to_mae: 300/300 steps (162 steps in 38 s, resumed at step 138) (moma)'
  assert lines[1].startswith('outputs: /tmp/wd/export/model (Flax) and model.pth (PyTorch)')
  assert 'configs/linear_probe.py:checkpoint=/tmp/wd/export/model' in lines[2]
  assert 'moma-knn --checkpoint /tmp/wd' in lines[2]
