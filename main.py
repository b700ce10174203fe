r"""Entry point: python main.py --config=configs/moco_to_mae.py[:ARGS] --workdir=DIR.

Every config value can be overridden: --config.moma.mask_ratio=0.85 (a misspelt key is a one-line
error). On a multi-host TPU pod slice or a multi-node GPU cluster, pass --jax_distributed (the same
command on every host). Re-running the same command in the same workdir resumes from its last
checkpoint. The same command line as `moma-train` (moma_jax/cli.py) after `pip install -e .`.
"""

from moma_jax.cli import run

if __name__ == '__main__':
  run()
