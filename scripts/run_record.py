r"""One training run's record as JSON, for docs/results/: its config (the sections that define a DINO
/ MOKD recipe), final metrics and the curve of its logged scalars (loss and the teacher entropies).

  python scripts/run_record.py /tmp/rn/adamw2e-3 --name resnet_adamw_400 \
      > docs/results/dino_recipes/resnet_r3_adamw_400.json

Reads WORKDIR/config.json, WORKDIR/final_metrics.json and the TensorBoard events the trainer writes
(clu's metric writer) in WORKDIR.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

CONFIG_KEYS = ('seed', 'num_train_steps', 'batch_size', 'model', 'cnn', 'vit', 'dino', 'mokd',
               'optim', 'optim_cnn', 'optim_vit')  # fmt: skip
CURVE = ('loss', 'teacher_entropy', 'teacher_batch_entropy')  # prefixes: MOKD adds /cnn, /vit


def curve(workdir: str) -> list[dict]:
  """Every logged step's loss and teacher entropies, from the events files."""
  from moma_jax.data.tf_quiet import tf

  rows: dict[int, dict] = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for raw in tf.data.TFRecordDataset(path, buffer_size=1 << 18):
      event = tf.compat.v1.Event.FromString(raw.numpy())
      for v in event.summary.value:
        if not v.tag.startswith(CURVE):
          continue
        value = tf.make_ndarray(v.tensor) if v.HasField('tensor') else v.simple_value
        rows.setdefault(int(event.step), {})[v.tag] = round(float(value), 4)
  return [{'step': s, **rows[s]} for s in sorted(rows)]


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('workdir')
  p.add_argument('--name', required=True, help='a short name for the run')
  a = p.parse_args(argv)
  with open(os.path.join(a.workdir, 'config.json')) as f:
    config = json.load(f)
  with open(os.path.join(a.workdir, 'final_metrics.json')) as f:
    final = json.load(f)['final']
  record = {'run': a.name, **{k: config[k] for k in CONFIG_KEYS if k in config}}
  record['views'] = sorted(config.get('data', {}).get('views', {}))
  record['final'] = final
  record['curve'] = curve(a.workdir)
  json.dump(record, sys.stdout, indent=1)
  print()


if __name__ == '__main__':
  main()
