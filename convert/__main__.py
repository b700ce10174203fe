"""Command line: ``python -m convert --src CKPT --dst DIR`` (import) or ``--src DIR --dst FILE`` (export).

Import: a PyTorch MAE / MoCo v3 / timm / torchvision ResNet / DINO / MOKD checkpoint (or a .safetensors file) becomes a Flax
checkpoint directory (orbax parameters + metadata.json), loadable with
``moma_jax.models.pretrained.load_pretrained(DIR)``.
Export: a converted or trained directory becomes a PyTorch ``{'model': state_dict}`` file in the
MAE / timm naming (or a .safetensors file when DST ends with .safetensors).
"""

from __future__ import annotations

import argparse
import sys

from convert.errors import ConvertError
from convert.formats import FORMATS


def _triple(text: str) -> tuple[float, float, float]:
  try:
    values = tuple(float(v) for v in text.split(','))
  except ValueError:
    values = ()
  if len(values) != 3:
    raise argparse.ArgumentTypeError(f'{text!r}: three comma-separated numbers, e.g. 0.5,0.5,0.5')
  return values


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):
    """Usage errors in one line (argparse prints the usage block too), exit code 2."""
    print(f'error: {message} (python -m convert --help)', file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = _Parser(prog='python -m convert', description=__doc__.split('\n')[0])
  p.add_argument('--src', required=True, help='PyTorch/safetensors file, or a converted directory')
  p.add_argument('--dst', required=True, help='output directory (import) or file (export)')
  p.add_argument(
    '--format',
    choices=sorted(set(FORMATS) | {'mae', 'mocov3'}),
    help='import: source format, when auto-detection needs help; export: mae, mocov3, '
    'torchvision (ResNets) or dino',
  )
  p.add_argument('--variant', help="ViT variant, e.g. 'B/16' or 'S12/16' (MoCo v3 ViT-S)")
  p.add_argument('--num-heads', type=int, help='attention heads (not visible in the weights)')
  p.add_argument('--image-size', type=int, help='resample position embeddings to this size')
  p.add_argument('--momentum', action='store_true', help='MoCo v3: keep the momentum encoder too')
  p.add_argument(
    '--mean', type=_triple, help='input mean the model was trained with, R,G,B (default ImageNet)'
  )
  p.add_argument(
    '--std', type=_triple, help='input std, R,G,B (default ImageNet; 0.5,0.5,0.5: timm)'
  )
  p.add_argument(
    '--checkpoint-key',
    help='DINO / MOKD checkpoints: which model (teacher, student; teacher_vit, teacher_cnn, ...)',
  )
  p.add_argument('--overwrite', action='store_true', help='replace an existing destination')
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  # Imported here so that --help and argument errors do not pay for importing JAX.
  from convert import convert
  from moma_jax import storage

  try:
    if storage.Path(args.src).is_dir():
      fmt = args.format if args.format in convert.EXPORT_FORMATS else None
      if args.format and fmt is None:
        raise ConvertError(f'--format for export: one of {", ".join(convert.EXPORT_FORMATS)}')
      keys = convert.export_checkpoint(args.src, args.dst, overwrite=args.overwrite, fmt=fmt)
      print(f'wrote {args.dst}: {len(keys)} tensors')
    else:
      meta = convert.convert_checkpoint(
        args.src,
        args.dst,
        fmt=args.format,
        variant=args.variant,
        num_heads=args.num_heads,
        image_size=args.image_size,
        momentum=args.momentum,
        overwrite=args.overwrite,
        mean=args.mean,
        std=args.std,
        checkpoint_key=args.checkpoint_key,
      )
      for note in meta['notes']:
        print(f'note: {note}')
      kinds = ', '.join(meta['components'])
      size = f' {meta["image_size"]}px' if meta.get('image_size') else ''
      print(
        f'wrote {args.dst}: {meta["format"]} {meta["variant"] or "custom model"}{size} ({kinds})'
      )
  except ConvertError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except OSError as e:  # the destination cannot be written (read-only, a file in the way, full)
    print(f'error: cannot write {args.dst}: {e}', file=sys.stderr)
    return 1
  return 0


def run() -> None:
  """Console-script entry point (moma-convert)."""
  from moma_jax import hardware

  hardware.quiet_libtpu()  # before JAX starts: no libtpu start-up errors on a machine without TPU
  sys.exit(main())


if __name__ == '__main__':
  run()
