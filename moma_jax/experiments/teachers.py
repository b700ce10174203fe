r"""The tiny self-supervised teachers shipped in ``teachers/``: how they are made and found.

Each is pre-trained on the embedded digits dataset (32 px, patch 4) with the project's own
``configs/mae_pretrain.py`` / ``configs/mocov3_pretrain.py`` (runlocal recipe, longer), exported by
the trainer in the official PyTorch format (MAE ``{'model': ...}`` with the decoder, MoCo v3
``.pth.tar`` with momentum encoder and heads), and loaded back through ``convert/`` like any
released checkpoint. Regenerate all of them (about 30 CPU-minutes on 2 cores; two processes with
``--only`` halve the wall time) with

  python -m moma_jax.experiments.teachers --out teachers

which also rewrites ``teachers/SHA256SUMS``. On the machine that made them the command reproduced the
files bit for bit; another CPU model may give slightly different bits (and hashes). How good they
are (k-NN and linear probe against a randomly initialised encoder of the same size) is in
docs/results.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from configs.shipped import RECIPES, TEACHER_DIR, Recipe, path  # noqa: F401  (re-exported)
from convert.convert import sha256
from moma_jax import hardware, storage

SUMS = 'SHA256SUMS'


BATCH = 128


def read_sums(directory: str = TEACHER_DIR) -> dict[str, str]:
  """{file name: sha256} from the directory's SHA256SUMS (sha256sum's format)."""
  sums = {}
  with open(os.path.join(directory, SUMS)) as f:
    for line in f:
      if line.strip():
        digest, name = line.split()
        sums[name.lstrip('*')] = digest
  return sums


def config_for(name: str, steps: int | None = None):
  """The pre-training config of a shipped teacher (runlocal recipe at BATCH, ``steps`` long)."""
  import importlib

  r = RECIPES[name]
  c = importlib.import_module(f'configs.{r.config}').get_config('runlocal')
  (c.model if 'model' in c else c.classifier).variant = r.variant
  c.batch_size = BATCH
  c.num_train_steps = steps or r.steps
  c.checkpoint_every = c.num_train_steps
  c.log_every = 100
  return c


def train_teacher(name: str, out_dir: str, workdir: str, steps: int | None = None) -> str:
  """Pre-trains one teacher and copies its PyTorch export to out_dir; returns the file path."""
  from moma_jax import train

  config = config_for(name, steps)
  final = train.train_and_evaluate(config, workdir)
  os.makedirs(out_dir, exist_ok=True)
  dst = os.path.join(out_dir, RECIPES[name].file)
  with storage.local_output(dst) as tmp:
    shutil.copyfile(os.path.join(workdir, 'export', 'model.pth'), tmp)
  print(f'{name}: {dst} ({os.path.getsize(dst) / 1e6:.2f} MB), k-NN {final.get("knn/model/top1")}')
  return dst


def write_sums(out_dir: str) -> None:
  names = sorted(f for f in os.listdir(out_dir) if f.endswith(('.pth', '.pth.tar')))
  with open(os.path.join(out_dir, SUMS), 'w') as f:
    for n in names:
      f.write(f'{sha256(os.path.join(out_dir, n))}  {n}\n')


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--out', default=TEACHER_DIR, help='where the .pth files and SHA256SUMS go')
  p.add_argument('--workdir', default=None, help='training workdirs (default: a temporary one)')
  p.add_argument('--only', nargs='+', choices=list(RECIPES), default=list(RECIPES))
  p.add_argument('--steps', type=int, default=None, help='override every recipe (smoke tests)')
  a = p.parse_args(argv)
  hardware.quiet_libtpu()  # before JAX starts: no libtpu start-up errors without a TPU
  import tempfile

  with tempfile.TemporaryDirectory() as tmp:
    for name in a.only:
      t0 = time.time()
      train_teacher(name, a.out, os.path.join(a.workdir or tmp, name), a.steps)
      print(f'{name}: {time.time() - t0:.0f}s', flush=True)
  write_sums(a.out)


if __name__ == '__main__':
  main()
