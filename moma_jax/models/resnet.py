"""ResNet (torchvision layout) in Flax linen: ResNet-18/34/50/101/152 and tiny variants for 32 px.

Parameter names mirror torchvision's state-dict names (``layer2.0.downsample.1.running_mean`` is
``batch_stats/layer2_0/downsample_1/mean`` here), so conversion is the same mechanical rename as
the ViT's (``convert/layouts.py``). torchvision's numerics: BatchNorm eps 1e-5, momentum 0.1
(Flax 0.9), the stride of a bottleneck on its 3x3 conv ("ResNet v1.5"), PyTorch's explicit
padding (not 'SAME', which pads a stride-2 conv asymmetrically), max-pool padding with -inf.

BatchNorm statistics are a separate ``batch_stats`` collection: objectives keep them in the train
state's ``extra`` (as MoCo v3's heads do) and apply the model with ``mutable=['batch_stats']`` in
training; under jit over global arrays the batch statistics are those of the global batch
(SyncBatchNorm), whatever the sharding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moma_jax.models import variants

Array = jax.Array

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1


def is_resnet_variant(name: str) -> bool:
  return name.startswith('resnet')


def decode_variant(name: str) -> dict[str, Any]:
  """'resnet50' -> ResNet constructor kwargs (block, stage_sizes, width, small_stem)."""
  if name not in variants.RESNETS:
    raise ValueError(f'unknown ResNet variant {name!r}; one of {", ".join(variants.RESNETS)}')
  block, stages, width, small = variants.RESNETS[name]
  return dict(block=block, stage_sizes=stages, width=width, small_stem=small)


def name_variant(block: str, stage_sizes, width: int, small_stem: bool) -> str | None:
  for name, spec in variants.RESNETS.items():
    if spec == (block, tuple(stage_sizes), width, small_stem):
      return name
  return None


def _conv(features: int, k: int, stride: int, name: str, dtype) -> nn.Conv:
  # torchvision's init: kaiming normal, fan_out, ReLU gain.
  return nn.Conv(
    features, (k, k), (stride, stride), padding=((k // 2, k // 2),) * 2, use_bias=False,
    kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'), dtype=dtype, name=name,
  )  # fmt: skip


class BatchNorm(nn.Module):
  """PyTorch's BatchNorm2d: batch statistics in training (biased variance to normalise, the
  unbiased one into the running variance, as torch), running statistics otherwise.

  Flax's nn.BatchNorm stores the biased variance, a factor n / (n - 1) off torch's running_var.
  Statistics over every axis but the last; under jit over a sharded global batch they are the
  global batch's (SyncBatchNorm).
  """

  use_running_average: bool
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    f = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (f,))
    bias = self.param('bias', nn.initializers.zeros, (f,))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((f,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((f,), jnp.float32))
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      x32 = x.astype(jnp.float32)
      mean = x32.mean(axes)
      var = jnp.square(x32 - mean).mean(axes)
      if not self.is_initializing():
        n = int(np.prod([x.shape[a] for a in axes]))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var * (n / max(n - 1, 1))
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


def _bn(train: bool, name: str, dtype) -> BatchNorm:
  return BatchNorm(use_running_average=not train, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  expansion = 1

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    bn = lambda n: _bn(train, n, self.dtype)  # noqa: E731
    y = nn.relu(bn('bn1')(_conv(self.planes, 3, self.stride, 'conv1', self.dtype)(x)))
    y = bn('bn2')(_conv(self.planes, 3, 1, 'conv2', self.dtype)(y))
    if self.downsample:
      x = bn('downsample_1')(_conv(self.planes, 1, self.stride, 'downsample_0', self.dtype)(x))
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    bn = lambda n: _bn(train, n, self.dtype)  # noqa: E731
    y = nn.relu(bn('bn1')(_conv(self.planes, 1, 1, 'conv1', self.dtype)(x)))
    y = nn.relu(bn('bn2')(_conv(self.planes, 3, self.stride, 'conv2', self.dtype)(y)))
    y = bn('bn3')(_conv(self.planes * 4, 1, 1, 'conv3', self.dtype)(y))
    if self.downsample:
      x = bn('downsample_1')(_conv(self.planes * 4, 1, self.stride, 'downsample_0', self.dtype)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """torchvision ResNet; with ``num_classes=0`` (DINO's ``fc = nn.Identity()``) an encoder.

  Attributes:
    block: 'basic' (ResNet-18/34) or 'bottleneck' (50/101/152).
    stage_sizes: blocks per stage (layer1 ... layer4).
    width: stem width and planes of layer1 (torchvision: 64); layer i has width * 2**(i-1).
    small_stem: a 3x3 stride-1 stem conv and no max-pool (for 32 px inputs) instead of the
      7x7 stride-2 conv + 3x3 stride-2 max-pool.
    num_classes: 0 for no ``fc``.
  """

  block: str = 'bottleneck'
  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 64
  small_stem: bool = False
  num_classes: int = 0
  channels: int = 3
  dtype: Any = jnp.float32

  @property
  def expansion(self) -> int:
    return 4 if self.block == 'bottleneck' else 1

  @property
  def out_dim(self) -> int:
    """Width of the pooled features (2048 for ResNet-50)."""
    return self.width * 2 ** (len(self.stage_sizes) - 1) * self.expansion

  @property
  def stride(self) -> int:
    """Input pixels per pixel of the final feature map (32; 8 with the small stem)."""
    return (1 if self.small_stem else 4) * 2 ** (len(self.stage_sizes) - 1)

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> tuple[Array, dict[str, Array]]:
    """images [B, H, W, C] (normalised) -> (pooled [B, out_dim] or logits, aux).

    aux: 'feature_map' [B, H / stride, W / stride, out_dim] (layer4's output), 'pre_logits'.
    With ``train`` BatchNorm uses (and updates) batch statistics: apply with
    ``mutable=['batch_stats']``.
    """
    if self.block not in ('basic', 'bottleneck'):
      raise ValueError(f"ResNet block must be 'basic' or 'bottleneck', not {self.block!r}")
    block_cls = Bottleneck if self.block == 'bottleneck' else BasicBlock
    x = images.astype(self.dtype)
    if self.small_stem:
      x = _conv(self.width, 3, 1, 'conv1', self.dtype)(x)
    else:
      x = _conv(self.width, 7, 2, 'conv1', self.dtype)(x)
    x = nn.relu(_bn(train, 'bn1', self.dtype)(x))
    if not self.small_stem:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    in_planes = self.width
    for s, n in enumerate(self.stage_sizes):
      planes = self.width * 2**s
      for b in range(n):
        stride = 2 if (s > 0 and b == 0) else 1
        down = b == 0 and (stride != 1 or in_planes != planes * self.expansion)
        x = block_cls(planes, stride, down, self.dtype, name=f'layer{s + 1}_{b}')(x, train)
        in_planes = planes * self.expansion
    aux = {'feature_map': x}
    pooled = x.mean(axis=(1, 2))
    aux['pre_logits'] = pooled
    if not self.num_classes:
      return pooled, aux
    return nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(pooled), aux


def kwargs_of(model: ResNet) -> dict[str, Any]:
  """Constructor kwargs that define the architecture (what a checkpoint's metadata records)."""
  keep = ('block', 'stage_sizes', 'width', 'small_stem', 'num_classes', 'channels')
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name in keep}


def forward_flops(model: ResNet, size: int) -> float:
  """Forward FLOPs (2 x multiply-adds of the convolutions and fc) on one [size, size] image;
  about 8.2 GFLOP for ResNet-50 at 224 px."""
  total = 0.0
  side = size
  if model.small_stem:
    total += 2 * side * side * 9 * model.channels * model.width
  else:
    side = (side + 1) // 2
    total += 2 * side * side * 49 * model.channels * model.width
    side = (side + 1) // 2
  cin = model.width
  for s, n in enumerate(model.stage_sizes):
    planes = model.width * 2**s
    for b in range(n):
      stride = 2 if (s > 0 and b == 0) else 1
      out_side = (side + stride - 1) // stride
      if model.block == 'bottleneck':
        total += 2 * side * side * cin * planes  # 1x1 at the input resolution
        total += 2 * out_side * out_side * 9 * planes * planes
        total += 2 * out_side * out_side * planes * planes * 4
        cout = planes * 4
      else:
        total += 2 * out_side * out_side * 9 * cin * planes
        total += 2 * out_side * out_side * 9 * planes * planes
        cout = planes
      if b == 0 and (stride != 1 or cin != cout):
        total += 2 * out_side * out_side * cin * cout
      cin, side = cout, out_side
  return total + 2 * cin * model.num_classes
