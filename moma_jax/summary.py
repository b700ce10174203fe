"""The final summary block of a run: what was trained, how well, next to its baselines.

Printed by main.py at the end of every run and stored in final_metrics.json, so a reader sees the
result and what it must beat (chance, raw pixels, the same architecture randomly initialised,
the teachers, the student before training)
without opening TensorBoard.
"""

from __future__ import annotations

from typing import Any

BEFORE = 'knn/model_before'  # prefix of the k-NN of the model at step 0 (before training)


def _pct(x: float) -> str:
  return f'{100 * x:5.1f}%'


def final_block(
  *, name: str, objective: str, step: int, total_steps: int, seconds: float, dataset: str,
  num_classes: int, final: dict[str, Any],
) -> list[str]:  # fmt: skip
  """Lines of the summary: run facts, then k-NN and / or classification results with baselines."""
  lines = [f'{name}: {step}/{total_steps} steps in {seconds:.0f} s ({objective})']
  chance = 1.0 / num_classes if num_classes else None
  model = {'moma': 'student', 'classification': 'classifier'}.get(objective, 'model')
  if 'knn/model/top1' in final:
    lines.append(f'k-NN top-1 on {dataset} (k 20, T 0.07):')
    rows = []
    after = final['knn/model/top1']
    if f'{BEFORE}/top1' in final:
      before = final[f'{BEFORE}/top1']
      rows.append((model, f'{_pct(after)}  (before training {_pct(before).strip()})'))
    else:
      rows.append((model, _pct(after)))
    for key, value in sorted(final.items()):
      if key.startswith('knn/teacher_') and key.endswith('/top1'):
        rows.append((f'teacher {key.split("/")[1].removeprefix("teacher_")}', _pct(value)))
    if 'knn/random_init/top1' in final:
      rows.append((f'random-init {model}', _pct(final['knn/random_init/top1'])))
    if 'knn/raw_pixels/top1' in final:
      rows.append(('raw pixels', _pct(final['knn/raw_pixels/top1'])))
    if chance:
      rows.append(('chance', _pct(chance)))
    width = max(len(r[0]) for r in rows)
    lines += [f'  {label:<{width}}  {value}' for label, value in rows]
  if 'eval/top1' in final:
    extra = f', chance {_pct(chance).strip()}' if chance else ''
    lines.append(
      f'classification on {dataset}: top-1 {_pct(final["eval/top1"]).strip()}, '
      f'top-5 {_pct(final.get("eval/top5", float("nan"))).strip()}{extra}'
    )
  return lines
