"""Fault injection: kill a real `main.py` runlocal training (SIGKILL and SIGTERM, at random
moments) several times, resume it each time, and compare its final parameters with an
uninterrupted run's, bit for bit.

  python scripts/fault_injection.py --workdir /tmp/fault --kills 10

Prints one line per kill and a summary; exit code 0 iff the parameters are identical.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROGRESS = re.compile(r'step \d+/\d+ ')  # train.py's progress line


def _command(workdir: str, steps: int, checkpoint_every: int) -> list[str]:
  return [
    # recipe=paper: 10% of the patches, half the small-scale recipe's step; resumption does not
    # depend on the loss.
    sys.executable, 'main.py', '--config=configs/moco_to_mae.py:runlocal,recipe=paper', f'--workdir={workdir}',
    f'--config.num_train_steps={steps}', f'--config.checkpoint_every={checkpoint_every}',
    # No k-NN before or after: what is compared is the parameters.
    '--config.evaluators.knn.before=False', '--config.evaluators.knn.at_end=False',
    '--config.log_every=10',
  ]  # fmt: skip


def _env() -> dict[str, str]:
  # One device (the caller may fake several, as the tests do); the caller's other XLA flags are kept
  # (the tests' faster -O1 compilation: the same flags for every run, so bit-identity still holds).
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', ''))
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ' '.join(flags.split()),
          'PYTHONPATH': ROOT}  # fmt: skip


def _latest_step(workdir: str) -> int | None:
  d = os.path.join(workdir, 'checkpoints')
  steps = [int(n) for n in os.listdir(d) if re.fullmatch(r'\d+', n)] if os.path.isdir(d) else []
  return max(steps) if steps else None


def run(workdir: str, kills: int, steps: int, checkpoint_every: int, seed: int,
        min_delay: float, max_delay: float) -> dict:  # fmt: skip
  """Returns {'kills': [...], 'identical': bool, 'max_abs_diff': float}."""
  import jax
  import numpy as np

  from moma_jax.models.pretrained import load_pretrained

  rng = random.Random(seed)
  ref, faulty = os.path.join(workdir, 'reference'), os.path.join(workdir, 'faulty')
  subprocess.run(_command(ref, steps, checkpoint_every), cwd=ROOT, env=_env(), check=True,
                 capture_output=True)  # fmt: skip
  events = []
  for i in range(kills):
    sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
    proc = subprocess.Popen(_command(faulty, steps, checkpoint_every), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lines.extend, args=(proc.stderr,), daemon=True)
    reader.start()
    # Wait until training runs (its first progress line, `step N/M ...`), then kill at a random
    # moment after.
    t0 = time.time()
    while (
      proc.poll() is None
      and not any(_PROGRESS.search(ln) for ln in lines)
      and time.time() - t0 < 300
    ):
      time.sleep(0.05)
    delay = rng.uniform(min_delay, max_delay)
    time.sleep(delay)
    finished = proc.poll() is not None
    if not finished:
      proc.send_signal(sig)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    clean_exit = any('preemption notice' in ln for ln in lines)
    events.append(dict(signal=sig.name, after_s=round(delay, 1), exit_code=proc.returncode,
                       finished_before_kill=finished, saved_on_sigterm=clean_exit,
                       latest_checkpoint=_latest_step(faulty)))  # fmt: skip
    print(f'kill {i + 1}: {events[-1]}', flush=True)
  subprocess.run(_command(faulty, steps, checkpoint_every), cwd=ROOT, env=_env(), check=True,
                 capture_output=True)  # fmt: skip
  a = load_pretrained(os.path.join(ref, 'export', 'model')).params
  b = load_pretrained(os.path.join(faulty, 'export', 'model')).params
  diffs = jax.tree.leaves(
    jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)
  )
  return {'kills': events, 'identical': max(diffs) == 0.0, 'max_abs_diff': max(diffs)}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--kills', type=int, default=10)
  p.add_argument('--steps', type=int, default=2000)
  p.add_argument('--checkpoint_every', type=int, default=100)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--min_delay', type=float, default=0.0, help='seconds after training starts')
  p.add_argument('--max_delay', type=float, default=4.0)
  a = p.parse_args()
  out = run(a.workdir, a.kills, a.steps, a.checkpoint_every, a.seed, a.min_delay, a.max_delay)
  killed = [e for e in out['kills'] if not e['finished_before_kill']]
  print(
    f'{len(killed)} kills survived ({sum(e["signal"] == "SIGKILL" for e in killed)} SIGKILL, '
    f'{sum(e["signal"] == "SIGTERM" for e in killed)} SIGTERM; '
    f'{sum(e["saved_on_sigterm"] for e in killed)} SIGTERMs saved a checkpoint before exiting); '
    f'final parameters identical to the uninterrupted run: {out["identical"]} '
    f'(max abs diff {out["max_abs_diff"]})'
  )
  return 0 if out['identical'] else 1


if __name__ == '__main__':
  sys.path.insert(0, ROOT)
  raise SystemExit(main())
