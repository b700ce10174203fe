"""Runs plans (moma_jax/plan.py) in a fresh process, as the tests need libtpu's environment set
before JAX starts: python tests/plan_helpers.py DEPTH JOBS_JSON -> one JSON line of results.

DEPTH > 0 gives every ViT size that many blocks (widths, heads, tokens and batch unchanged) and
MAE decoders one block: a full-depth compile takes minutes on 2 cores, and the properties tested
(fits, shardings, FLOPs against the formula) do not depend on the depth. The test also sets
JAX_EXEC_TIME_OPTIMIZATION_EFFORT=-1 (XLA spends less time optimising the TPU program: 5x faster
compiles); the plan's users get the default effort, which the run itself compiles with.
JOBS_JSON: [{"config": "moco_to_mae[:args]", "target": "v5litepod-8", "overrides": {...}}, ...].
"""

from __future__ import annotations

import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moma_jax import hardware  # noqa: E402  (jax-free)


def main() -> None:
  depth, jobs = int(sys.argv[1]), json.loads(sys.argv[2])
  hardware.plan_environment(hardware.parse_target(jobs[0]['target']))
  from configs import common
  from moma_jax import plan
  from moma_jax.models import variants

  if depth:
    for name, (w, _, h) in list(variants.VARIANTS.items()):
      variants.VARIANTS[name] = (w, depth, h)
  results = []
  for job in jobs:
    name, _, arg = job['config'].partition(':')
    c = importlib.import_module(f'configs.{name}').get_config(arg or None)
    if depth and 'model' in c:
      c.model.decoder_depth = 1
    common.override(c, job.get('overrides', {}))
    try:
      results.append(plan.make_plan(c, job['target']))
    except plan.DoesNotFit as e:
      results.append({'error': str(e)})
  print(json.dumps(results, default=str))


if __name__ == '__main__':
  main()
