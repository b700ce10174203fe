"""Independent PyTorch references, written to the timm / MAE / MoCo v3 definitions, and writers of
checkpoints in each official format. Tests only: numerics of the Flax code are checked against these.
"""

from __future__ import annotations

import argparse
import collections
import copy

import numpy as np
import torch
from torch import nn


class Attention(nn.Module):
  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
    x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
    return self.proj(x)


class Mlp(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, patch: int, dim: int, chans: int = 3):
    super().__init__()
    self.proj = nn.Conv2d(chans, dim, kernel_size=patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
  """timm's VisionTransformer as MAE / MoCo v3 use it (+ MAE's decoder when decoder_dim is set)."""

  def __init__(
    self,
    img_size=224,
    patch=16,
    dim=768,
    depth=12,
    heads=12,
    num_classes=0,
    global_pool=False,
    decoder_dim=0,
    decoder_depth=0,
    decoder_heads=16,
  ):
    super().__init__()
    self.patch = patch
    self.patch_embed = PatchEmbed(patch, dim)
    n = (img_size // patch) ** 2
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02, requires_grad=False)
    self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
    self.global_pool = global_pool
    if global_pool:
      self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
    else:
      self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.head = nn.Linear(dim, num_classes) if num_classes else None
    self.decoder_dim = decoder_dim
    if decoder_dim:
      self.decoder_embed = nn.Linear(dim, decoder_dim)
      self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_dim) * 0.02)
      self.decoder_pos_embed = nn.Parameter(torch.randn(1, n + 1, decoder_dim) * 0.02)
      self.decoder_blocks = nn.ModuleList(
        [Block(decoder_dim, decoder_heads) for _ in range(decoder_depth)]
      )
      self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
      self.decoder_pred = nn.Linear(decoder_dim, patch * patch * 3)
    self.randomize()

  @torch.no_grad()
  def randomize(self):
    # Non-trivial norms and biases, so a mix-up of scale and bias cannot pass unnoticed.
    for name, p in self.named_parameters():
      if name.endswith('bias'):
        p.normal_(0, 0.02)
      elif p.ndim == 1:
        p.normal_(1.0, 0.1)

  def forward_encoder(self, x, keep_idx=None):
    """x [B,3,H,W]; keep_idx [B,n] visible patch indices -> (tokens [B,1+n,D], block outputs)."""
    x = self.patch_embed(x) + self.pos_embed[:, 1:]
    if keep_idx is not None:
      x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    inter = []
    for blk in self.blocks:
      x = blk(x)
      inter.append(x)
    if not self.global_pool:
      x = self.norm(x)
    return x, inter

  def forward(self, x, keep_idx=None):
    x, _ = self.forward_encoder(x, keep_idx)
    if self.global_pool:
      x = self.fc_norm(x[:, 1:].mean(1))
    else:
      x = x[:, 0]
    return self.head(x) if self.head is not None else x

  def forward_decoder(self, tokens, keep_idx):
    """MAE's forward_decoder, with ids_restore built from keep_idx."""
    b, n = keep_idx.shape
    num_patches = self.decoder_pos_embed.shape[1] - 1
    x = self.decoder_embed(tokens)
    full = self.mask_token.expand(b, num_patches, -1).clone()
    full.scatter_(1, keep_idx[..., None].expand(-1, -1, x.shape[-1]), x[:, 1:])
    x = torch.cat([x[:, :1], full], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
  """MoCo v3's _build_mlp."""
  mlp = []
  for i in range(num_layers):
    dim1 = input_dim if i == 0 else mlp_dim
    dim2 = output_dim if i == num_layers - 1 else mlp_dim
    mlp.append(nn.Linear(dim1, dim2, bias=False))
    if i < num_layers - 1:
      mlp.append(nn.BatchNorm1d(dim2))
      mlp.append(nn.ReLU(inplace=True))
    elif last_bn:
      mlp.append(nn.BatchNorm1d(dim2, affine=False))
  return nn.Sequential(*mlp)


@torch.no_grad()
def randomize_bn(module: nn.Module):
  for m in module.modules():
    if isinstance(m, nn.BatchNorm1d):
      m.running_mean.normal_(0, 0.5)
      m.running_var.uniform_(0.5, 2.0)
      m.num_batches_tracked.fill_(7)
      if m.affine:
        m.weight.normal_(1, 0.1)
        m.bias.normal_(0, 0.1)


# --- checkpoint writers in the official formats ---------------------------------------------------


def save_mae(model: VisionTransformer, path: str, training_state: bool = False) -> str:
  """MAE release format {'model': state_dict}; with training_state, also optimizer/epoch/scaler/args."""
  ckpt = {'model': model.state_dict()}
  if training_state:
    # A real optimizer state (exp_avg, exp_avg_sq, step tensors), from a step on a copy.
    shadow = copy.deepcopy(model)
    opt = torch.optim.AdamW(shadow.parameters(), lr=1e-3)
    for p in shadow.parameters():
      p.grad = torch.ones_like(p)
    opt.step()
    ckpt.update(
      optimizer=opt.state_dict(),
      epoch=399,
      scaler={'scale': 65536.0, 'growth_factor': 2.0},
      args=argparse.Namespace(model='mae_vit_base_patch16', mask_ratio=0.75, lr=None, blr=1.5e-4),
    )
  torch.save(ckpt, path)
  return path


def save_mocov3(
  encoder: VisionTransformer, path: str, arch: str = 'vit_base', proj_dim=(64, 32), momentum=True
) -> dict[str, nn.Module]:
  """MoCo v3 .pth.tar: module.base_encoder.* (head = projector), momentum_encoder, predictor."""
  width = encoder.cls_token.shape[-1]
  hidden, out = proj_dim
  encoder.head = build_mlp(3, width, hidden, out)
  predictor = build_mlp(2, out, hidden, out, last_bn=False)
  randomize_bn(encoder.head)
  randomize_bn(predictor)
  state = collections.OrderedDict()
  for k, v in encoder.state_dict().items():
    state[f'module.base_encoder.{k}'] = v
  if momentum:
    for k, v in encoder.state_dict().items():
      state[f'module.momentum_encoder.{k}'] = v + 1.0 if v.is_floating_point() else v
  for k, v in predictor.state_dict().items():
    state[f'module.predictor.{k}'] = v
  opt = torch.optim.AdamW(encoder.parameters())
  torch.save({'epoch': 300, 'arch': arch, 'state_dict': state, 'optimizer': opt.state_dict()}, path)
  return {'encoder': encoder, 'projector': encoder.head, 'predictor': predictor}


def save_safetensors(model: nn.Module, path: str) -> str:
  from safetensors.torch import save_file

  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  return path


def key_bias_apart(where: str, *arrays):
  """(arrays without the attention's key bias, the key-bias thirds or None) for a parameter at
  path ``where``. The key bias has a zero gradient in exact arithmetic (softmax ignores a
  per-query constant), so two Adams fed round-off there move it by different amounts of at most
  ~lr per step: trained-parameter comparisons check it against that bound, the rest tightly."""
  arrays = tuple(np.asarray(a) for a in arrays)
  if 'qkv' not in where or 'bias' not in where:
    return arrays, None
  d = arrays[0].shape[-1] // 3
  return (
    tuple(np.delete(a, np.s_[d : 2 * d], -1) for a in arrays),
    tuple(a[..., d : 2 * d] for a in arrays),
  )
