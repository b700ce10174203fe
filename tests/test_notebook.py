"""The Colab notebook runs top to bottom on CPU (cells tagged colab-only are skipped), so it cannot rot:
its install cell pip-installs this checkout, its distillation uses the shipped teachers.

Cells are executed in order as one script; IPython shell lines (`!cmd`) run through the shell with
{var} substituted, as IPython does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from runlocal_helpers import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'moma_colab.ipynb')


# A kernel started before the install cell, as on a fresh Colab runtime: this environment's own
# editable install of the checkout (its import hook, read at start-up) is taken away, and the
# script runs outside the repository, so only what the notebook itself does can make
# `import moma_jax` work (the first-run ModuleNotFoundError of issue 31).
_FRESH_KERNEL = [
  'import sys, importlib.util',
  "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]",
  "sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, '__module__', '').startswith('__editable__')]",
  'sys.path_importer_cache.clear()',
  "assert importlib.util.find_spec('moma_jax') is None, 'moma_jax importable before the install cell'",
]


def _to_script(nb: dict) -> str:
  lines = ['import subprocess as _sp', 'import matplotlib', "matplotlib.use('Agg')", *_FRESH_KERNEL]
  for cell in nb['cells']:
    if cell['cell_type'] != 'code' or 'colab-only' in cell['metadata'].get('tags', []):
      continue
    for line in ''.join(cell['source']).splitlines():
      m = re.match(r'^(\s*)!(.*)$', line)
      if m:
        cmd = m.group(2).replace('python ', f'{sys.executable} ', 1)
        line = f'{m.group(1)}_sp.run(f{cmd!r}, shell=True, check=True)'
      lines.append(line)
  return '\n'.join(lines) + '\n'


def test_notebook_runs_top_to_bottom(tmp_path):
  nb = json.load(open(NOTEBOOK))
  script = tmp_path / 'nb.py'
  script.write_text(_to_script(nb))
  env = {
    **{k: v for k, v in os.environ.items() if k != 'PYTHONPATH'},
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': FAST_COMPILE,  # one device; -O1 (see runlocal_helpers)
    'MPLBACKEND': 'Agg',
    'MOMA_REPO': ROOT,  # the install cell's repository path
    'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'],  # moma-convert
  }
  r = subprocess.run(
    [sys.executable, str(script)],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert 'knn/model/top1' in r.stdout
  assert re.search(r'student \(before -> after\) +\d+\.\d% ->', r.stdout), r.stdout[-2000:]
