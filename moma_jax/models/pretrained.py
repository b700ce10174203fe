"""The converted-checkpoint directory: writing it, and loading it back ready for ``model.apply``.

Layout of a checkpoint directory::

    DIR/metadata.json   what the weights are: components (module + constructor kwargs), source
                        file and sha256, format, variant, image size, input mean / std
    DIR/params/         orbax checkpoint of {component: {'params': ..., ['batch_stats': ...]}}

Components: 'encoder' (a ViT, always), and where the source has them 'decoder' (MAE),
'projector' / 'predictor' (MoCo v3 heads), 'momentum_encoder' (MoCo v3, on request).

Loading is strict: the stored tree must match the tree the module would create, key by key and
shape by shape; every difference is listed in one error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from moma_jax.models import heads, vit

METADATA_FILE = 'metadata.json'
PARAMS_DIR = 'params'
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MODULES: dict[str, type[nn.Module]] = {
  'ViT': vit.ViT,
  'MaeDecoder': heads.MaeDecoder,
  'MlpHead': heads.MlpHead,
}


class CheckpointMismatchError(ValueError):
  """Stored variables differ from what the module expects (missing / unexpected / shape)."""


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
  """How to rebuild one component: module class name, constructor kwargs, input width."""

  module: str
  kwargs: dict[str, Any]
  input_dim: int | None = None  # feature width fed to a head; None for the ViT (takes images)

  def build(self, **overrides: Any) -> nn.Module:
    if self.module not in MODULES:
      raise ValueError(f'unknown module {self.module!r}; known: {", ".join(MODULES)}')
    return MODULES[self.module](**{**self.kwargs, **overrides})

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Component:
  module: nn.Module
  variables: dict[str, Any]  # {'params': ..., ['batch_stats': ...]}


@dataclasses.dataclass
class Pretrained:
  """A loaded checkpoint. ``model.apply(params, images)`` runs the encoder."""

  model: vit.ViT
  params: dict[str, Any]
  metadata: dict[str, Any]
  heads: dict[str, Component]


_RUNTIME_ONLY = ('parent', 'name', 'dtype', 'attention_impl', 'drop_path', 'bn_axis_name')


def spec_of(module: nn.Module, input_dim: int | None = None) -> ComponentSpec:
  """The ComponentSpec that rebuilds ``module`` (runtime-only attributes such as dtype left out)."""
  kind = type(module).__name__
  if kind not in MODULES:
    raise ValueError(f'cannot export a {kind}; exportable: {", ".join(MODULES)}')
  kwargs = {
    f.name: getattr(module, f.name)
    for f in dataclasses.fields(module)
    if f.init and f.name not in _RUNTIME_ONLY
  }
  return ComponentSpec(kind, kwargs, input_dim)


def abstract_variables(spec: ComponentSpec) -> dict[str, Any]:
  """The variable tree (ShapeDtypeStructs) that ``spec``'s module creates, without allocating."""
  module = spec.build()
  rng = jax.random.key(0)
  if isinstance(module, vit.ViT):
    s = module.image_size
    args = (jnp.zeros((1, s, s, module.channels)),)
  elif isinstance(module, heads.MaeDecoder):
    args = (jnp.zeros((1, 2, spec.input_dim)), jnp.zeros((1, 1), jnp.int32))
  else:
    args = (jnp.zeros((2, spec.input_dim)),)
  return dict(jax.eval_shape(module.init, rng, *args))


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    '/'.join(str(getattr(k, 'key', k)) for k in path): tuple(np.shape(leaf)) for path, leaf in flat
  }


def check_variables(expected: Any, actual: Any, what: str) -> None:
  """Raises CheckpointMismatchError listing every missing, unexpected and mis-shaped entry."""
  exp, act = _flat_shapes(expected), _flat_shapes(actual)
  missing = [f'{k} {exp[k]}' for k in exp if k not in act]
  unexpected = [f'{k} {act[k]}' for k in act if k not in exp]
  shapes = [
    f'{k}: checkpoint {act[k]} vs model {exp[k]}' for k in exp if k in act and exp[k] != act[k]
  ]
  problems = []
  if missing:
    problems.append(f'missing {len(missing)}: ' + ', '.join(missing))
  if unexpected:
    problems.append(f'unexpected {len(unexpected)}: ' + ', '.join(unexpected))
  if shapes:
    problems.append(f'shape mismatch {len(shapes)}: ' + ', '.join(shapes))
  if problems:
    raise CheckpointMismatchError(f'{what} does not match its model; ' + '; '.join(problems))


def save_pretrained(
  dst: str | os.PathLike,
  specs: dict[str, ComponentSpec],
  variables: dict[str, dict[str, Any]],
  metadata: dict[str, Any],
  *,
  overwrite: bool = False,
) -> None:
  """Writes a checkpoint directory atomically (temporary directory, then rename).

  Each component's variables are checked against its module first, so nothing is written for a
  tree that would not load. An existing ``dst`` is replaced only with ``overwrite``, and only once
  the new directory is complete.
  """
  dst = os.path.abspath(os.fspath(dst))
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f'{dst} already exists; pass --overwrite to replace it')
  if set(specs) != set(variables) or 'encoder' not in specs:
    raise ValueError(f'components {sorted(specs)} vs variables {sorted(variables)}; need encoder')
  for name, spec in specs.items():
    check_variables(abstract_variables(spec), variables[name], f'component {name!r}')
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(dst)}.tmp-', dir=parent)
  try:
    tree = jax.tree.map(np.asarray, variables)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS_DIR), tree)
    meta = {
      **metadata,
      'components': {k: v.to_json() for k, v in specs.items()},
      # orbax files carry no checksums: ours make any corruption a clean error at load time.
      'params_sha256': _hash_tree(os.path.join(tmp, PARAMS_DIR)),
    }
    with open(os.path.join(tmp, METADATA_FILE), 'w') as f:
      json.dump(meta, f, indent=2, sort_keys=True)
    if os.path.exists(dst):
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(dst)}.old-', dir=parent)
      os.rename(dst, os.path.join(old, 'x'))
      os.rename(tmp, dst)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _hash_tree(root: str) -> dict[str, str]:
  """sha256 of every file under ``root``, by relative path."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      full = os.path.join(dirpath, name)
      h = hashlib.sha256()
      with open(full, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
          h.update(chunk)
      out[os.path.relpath(full, root)] = h.hexdigest()
  return out


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  if os.path.isfile(path):
    raise FileNotFoundError(
      f'{path} is a file, not a converted checkpoint directory; convert it first: '
      f'python -m convert --src {path} --dst DIR'
    )
  meta_path = os.path.join(os.fspath(path), METADATA_FILE)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(
      f'{path} is not a converted checkpoint directory (no {METADATA_FILE}); '
      'convert a PyTorch checkpoint first: python -m convert --src CKPT --dst DIR'
    )
  with open(meta_path) as f:
    return json.load(f)


def load_pretrained(path: str | os.PathLike, **model_overrides: Any) -> Pretrained:
  """Loads a directory written by ``python -m convert`` (or by the trainer's export).

  Args:
    path: the checkpoint directory.
    **model_overrides: non-shape ViT attributes to change, e.g. ``dtype=jnp.bfloat16``,
      ``attention_impl='cudnn'``, ``drop_path=0.1``.

  Returns:
    Pretrained(model, params, metadata, heads): ``model.apply(params, images[, visible_idx])``
    gives (tokens or logits, intermediates); images are [B, H, W, 3] normalised with
    ``metadata['mean']`` / ``metadata['std']``.
  """
  meta = read_metadata(path)
  specs = {k: ComponentSpec(**v) for k, v in meta['components'].items()}
  params_dir = os.path.join(os.fspath(path), PARAMS_DIR)
  expected = meta.get('params_sha256')
  if expected is not None:
    actual = _hash_tree(params_dir) if os.path.isdir(params_dir) else {}
    bad = sorted(k for k in expected if actual.get(k) != expected[k])
    if bad:
      raise CheckpointMismatchError(
        f'{path} is corrupt or truncated: {len(bad)} parameter file(s) missing or changed '
        f'({", ".join(bad[:3])}); convert or export it again'
      )
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(params_dir)
  except Exception as e:  # noqa: BLE001 -- orbax / tensorstore raise many types; one line for all
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointMismatchError(
      f'{path}: parameters unreadable (truncated or corrupt?): {msg}'
    ) from None
  components = {}
  for name, spec in specs.items():
    if name not in restored:
      raise CheckpointMismatchError(f'{path}: component {name!r} is missing from the parameters')
    check_variables(abstract_variables(spec), restored[name], f'{path} component {name!r}')
    variables = jax.tree.map(jnp.asarray, restored[name])
    overrides = model_overrides if name == 'encoder' else {}
    components[name] = Component(spec.build(**overrides), variables)
  encoder = components.pop('encoder')
  return Pretrained(encoder.module, encoder.variables, meta, components)
