"""The final summary block of a run: what was trained, how well, next to its baselines.

Printed by main.py at the end of every run and stored in final_metrics.json, so a reader sees the
result and what it must beat (chance, raw pixels, the same architecture randomly initialised,
the teachers, the student before training), in k-NN and linear-probe top-1, without opening
TensorBoard.
"""

from __future__ import annotations

from typing import Any

BEFORE = 'knn/model_before'  # prefix of the model's k-NN / linear probe at step 0 (before training)


def _pct(x: float) -> str:
  return f'{100 * x:5.1f}%'


def _knn_rows(final: dict[str, Any], model: str, chance: float | None) -> list[tuple[str, ...]]:
  """(label, k-NN cell, linear cell) for every row of the k-NN table; a cell is '' when absent."""

  def cells(prefix: str) -> tuple[str, str]:
    return tuple(
      _pct(final[f'{prefix}/{m}']) if f'{prefix}/{m}' in final else '' for m in ('top1', 'linear')
    )

  def before_after(m: str) -> str:
    after, before = final.get(f'knn/model/{m}'), final.get(f'{BEFORE}/{m}')
    if after is None:
      return ''
    return _pct(after) if before is None else f'{_pct(before).strip()} -> {_pct(after).strip()}'

  has_before = any(f'{BEFORE}/{m}' in final for m in ('top1', 'linear'))
  label = f'{model} (before -> after)' if has_before else model
  rows = [(label, before_after('top1'), before_after('linear'))]
  for key in sorted(final):
    if key.startswith('knn/teacher_') and key.endswith('/top1'):
      rows.append((f'teacher {key.split("/")[1].removeprefix("teacher_")}', *cells(key[:-5])))
  if 'knn/random_init/top1' in final:
    rows.append((f'random-init {model}', *cells('knn/random_init')))
  if 'knn/raw_pixels/top1' in final:
    rows.append(('raw pixels', *cells('knn/raw_pixels')))
  if chance:
    rows.append(('chance', _pct(chance), _pct(chance)))
  return rows


def final_block(
  *, name: str, objective: str, step: int, total_steps: int, seconds: float, dataset: str,
  num_classes: int, final: dict[str, Any], first_step: int = 0, workdir: str = '',
  exported: bool = False,
) -> list[str]:  # fmt: skip
  """Lines of the summary: run facts, then k-NN and / or classification results with baselines.

  The k-NN results are a table: one row per encoder (the model before -> after training, its
  teachers, the same architecture randomly initialised, raw pixels, chance), one column for the
  k-NN top-1 and, when the linear probe ran (``knn/.../linear`` keys), one for its top-1.
  """
  ran = f'in {seconds:.0f} s'
  if first_step:  # a resumed run: what this process ran, not the whole schedule
    ran = f'({step - first_step} steps in {seconds:.0f} s, resumed at step {first_step})'
  lines = [f'{name}: {step}/{total_steps} steps {ran} ({objective})']
  chance = 1.0 / num_classes if num_classes else None
  model = {'moma': 'student', 'classification': 'classifier'}.get(objective, 'model')
  if 'knn/model/top1' in final:
    rows = _knn_rows(final, model, chance)
    linear = any(f'{p}/linear' in final for p in ('knn/model', BEFORE))
    if linear:
      lines.append(f'k-NN (k 20, T 0.07) and linear-probe top-1 on {dataset}:')
      header, rows = ('', 'k-NN', 'linear'), [(r[0], r[1], r[2] or '-') for r in rows]
    else:
      lines.append(f'k-NN (k 20, T 0.07) top-1 on {dataset}:')
      header, rows = ('', 'k-NN'), [r[:2] for r in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
      label, *values = r
      line = f'  {label:<{widths[0]}}' + ''.join(
        f'  {v:>{w}}' for v, w in zip(values, widths[1:], strict=True)
      )
      lines.append(line.rstrip())
  if 'eval/top1' in final:
    extra = f', chance {_pct(chance).strip()}' if chance else ''
    lines.append(
      f'classification on {dataset}: top-1 {_pct(final["eval/top1"]).strip()}, '
      f'top-5 {_pct(final.get("eval/top5", float("nan"))).strip()}{extra}'
    )
  if workdir:
    out = f'{workdir}/export/model (Flax) and model.pth (PyTorch), ' if exported else ''
    lines.append(
      f'outputs: {out}checkpoints in {workdir}/checkpoints, metrics: tensorboard --logdir {workdir}'
    )
    if exported:
      lines.append(
        f'next: python main.py --config=configs/linear_probe.py:checkpoint={workdir}/export/model '
        '--workdir=DIR (or finetune.py), moma-knn --checkpoint '
        f'{workdir} --dataset NAME'
      )
  return lines
