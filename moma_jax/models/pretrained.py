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
import uuid
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from moma_jax import storage
from moma_jax.models import heads, resnet, vit

METADATA_FILE = 'metadata.json'
PARAMS_DIR = 'params'
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Normalization:
  """The input statistics a model was trained with: uint8 images -> (x / 255 - mean) / std.

  Each model carries its own (from its checkpoint's metadata, or the config for a random init),
  so a teacher and a student trained with different statistics each see what they were trained on.
  """

  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD

  def __post_init__(self):
    mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
      raise ValueError(f'input normalisation mean={mean} std={std}: need 3 values each, std > 0')
    object.__setattr__(self, 'mean', mean)
    object.__setattr__(self, 'std', std)

  def __call__(self, images: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 [B, H, W, 3] -> float [B, H, W, 3]."""
    x = images.astype(jnp.float32) / 255.0
    return ((x - jnp.asarray(self.mean)) / jnp.asarray(self.std)).astype(dtype)

  @classmethod
  def from_metadata(cls, metadata: dict[str, Any]) -> Normalization:
    """From a checkpoint's metadata ('mean' / 'std'); ImageNet's where it records none."""
    return cls(tuple(metadata.get('mean', IMAGENET_MEAN)), tuple(metadata.get('std', IMAGENET_STD)))

  def to_metadata(self) -> dict[str, list[float]]:
    return {'mean': list(self.mean), 'std': list(self.std)}


IMAGENET = Normalization()

MODULES: dict[str, type[nn.Module]] = {
  'ViT': vit.ViT,
  'MaeDecoder': heads.MaeDecoder,
  'MlpHead': heads.MlpHead,
  'ResNet': resnet.ResNet,
  'DinoHead': heads.DinoHead,
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

  @property
  def normalization(self) -> Normalization:
    """How this model's inputs must be normalised (its checkpoint's mean / std)."""
    return Normalization.from_metadata(self.metadata)


_RUNTIME_ONLY = (
  'parent',
  'name',
  'dtype',
  'attention_impl',
  'drop_path',
  'bn_axis_name',
  'remat',
  'remat_policy',
  'scan_blocks',
)


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
  elif isinstance(module, resnet.ResNet):  # fully convolutional: any size gives the same tree
    args = (jnp.zeros((1, 32, 32, module.channels)),)
  elif isinstance(module, heads.MaeDecoder):
    args = (jnp.zeros((1, 2, spec.input_dim)), jnp.zeros((1, 1), jnp.int32))
  else:
    args = (jnp.zeros((2, spec.input_dim)),)
  return dict(jax.eval_shape(module.init, rng, *args))


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


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
  dst: storage.PathLike,
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
  dst = storage.resolve(dst)
  if dst.exists() and not overwrite:
    raise FileExistsError(f'{dst} already exists; pass --overwrite to replace it')
  if set(specs) != set(variables) or 'encoder' not in specs:
    raise ValueError(f'components {sorted(specs)} vs variables {sorted(variables)}; need encoder')
  for name, spec in specs.items():
    check_variables(abstract_variables(spec), variables[name], f'component {name!r}')
  dst.parent.mkdir(parents=True, exist_ok=True)
  # Local disks: build in a temporary sibling, then rename (atomic). Object stores have no
  # directory rename (it is a copy of every object): write in place, metadata.json last.
  remote = storage.is_remote(dst)
  if remote and dst.exists():
    dst.rmtree()
  tmp = dst if remote else dst.parent / f'.{dst.name}.tmp-{uuid.uuid4().hex[:8]}'
  try:
    tree = jax.tree.map(np.asarray, variables)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / PARAMS_DIR, tree)
    meta = {
      **metadata,
      'components': {k: v.to_json() for k, v in specs.items()},
      # orbax files carry no checksums: ours make any corruption a clean error at load time.
      'params_sha256': _hash_tree(tmp / PARAMS_DIR),
    }
    # metadata.json is written last: a directory without it is never taken for a checkpoint.
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if remote:
      return
    if dst.exists():
      old = dst.parent / f'.{dst.name}.old-{uuid.uuid4().hex[:8]}'
      dst.rename(old)
      tmp.rename(dst)
      old.rmtree()
    else:
      tmp.rename(dst)
  finally:
    if not remote and tmp.exists():
      tmp.rmtree()


def _hash_tree(root: storage.PathLike) -> dict[str, str]:
  """sha256 of every file under ``root``, by relative path (local disks and object stores)."""
  root = storage.Path(root)
  out = {}
  # iterdir rather than walk(): epath's walk drops the gs:// scheme from the paths it yields.
  pending = [root]
  while pending:
    for child in pending.pop().iterdir():
      if child.is_dir():
        pending.append(child)
        continue
      h = hashlib.sha256()
      with child.open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
          h.update(chunk)
      out[os.fspath(child.relative_to(root))] = h.hexdigest()
  return out


def read_metadata(path: storage.PathLike) -> dict[str, Any]:
  p = storage.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'checkpoint {path} does not exist')
  if not p.is_dir():
    raise FileNotFoundError(
      f'{path} is a file, not a converted checkpoint directory; convert it first: '
      f'python -m convert --src {path} --dst DIR'
    )
  meta_path = p / METADATA_FILE
  if not meta_path.exists():
    raise FileNotFoundError(
      f'{path} is not a converted checkpoint directory (no {METADATA_FILE}); '
      'convert a PyTorch checkpoint first: python -m convert --src CKPT --dst DIR'
    )
  try:
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta.get('components'), dict) or 'encoder' not in meta['components']:
      raise KeyError('components')
    for spec in meta['components'].values():
      ComponentSpec(**spec)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointMismatchError(
      f'{meta_path} is not a moma_jax checkpoint description ({type(e).__name__}: {e}); '
      'convert or export the checkpoint again'
    ) from None
  return meta


def load_pretrained(
  path: storage.PathLike, shapes_only: bool = False, **model_overrides: Any
) -> Pretrained:
  """Loads a directory written by ``python -m convert`` (or by the trainer's export).

  Args:
    path: the checkpoint directory.
    shapes_only: read the metadata only; the variables are ShapeDtypeStructs (a plan: nothing
      is read from the parameter files, nothing allocated).
    **model_overrides: non-shape ViT attributes to change, e.g. ``dtype=jnp.bfloat16``,
      ``attention_impl='cudnn'``, ``drop_path=0.1``.

  Returns:
    Pretrained(model, params, metadata, heads): ``model.apply(params, images[, visible_idx])``
    gives (tokens or logits, intermediates); images are [B, H, W, 3] normalised with
    ``metadata['mean']`` / ``metadata['std']``.
  """
  path = storage.resolve(path)  # orbax wants absolute paths
  meta = read_metadata(path)
  specs = {k: ComponentSpec(**v) for k, v in meta['components'].items()}
  restored = None if shapes_only else _restore_params(path, meta)
  components = {}
  for name, spec in specs.items():
    if restored is None:
      variables = abstract_variables(spec)
    elif name not in restored:
      raise CheckpointMismatchError(f'{path}: component {name!r} is missing from the parameters')
    else:
      check_variables(abstract_variables(spec), restored[name], f'{path} component {name!r}')
      variables = jax.tree.map(jnp.asarray, restored[name])
    overrides = model_overrides if name == 'encoder' else {}
    components[name] = Component(spec.build(**overrides), variables)
  encoder = components.pop('encoder')
  return Pretrained(encoder.module, encoder.variables, meta, components)


def _restore_params(path: storage.Path, meta: dict[str, Any]) -> dict[str, Any]:
  """The parameter arrays of a checkpoint directory, their hashes checked first (host numpy)."""
  params_dir = storage.Path(path) / PARAMS_DIR
  expected = meta.get('params_sha256')
  if expected is not None:
    actual = _hash_tree(params_dir) if params_dir.is_dir() else {}
    bad = sorted(k for k in expected if actual.get(k) != expected[k])
    if bad:
      raise CheckpointMismatchError(
        f'{path} is corrupt or truncated: {len(bad)} parameter file(s) missing or changed '
        f'({", ".join(bad[:3])}); convert or export it again'
      )
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(params_dir)
  except Exception as e:  # noqa: BLE001 -- orbax / tensorstore raise many types; one line for all
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointMismatchError(
      f'{path}: parameters unreadable (truncated or corrupt?): {msg}'
    ) from None
