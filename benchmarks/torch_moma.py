"""The MOMA distillation step in plain PyTorch: the reference the JAX step is benchmarked against.

It does exactly the work of ``moma_jax.objectives.moma.Moma`` with one teacher, student_view
'masked', align 'both', teacher_norm 'own+ln' and the trainer's AdamW (decay on matrices only):

  images uint8 [B,H,W,3] -> normalise -> patchify
  teacher (no_grad): all N patches + CLS -> final LayerNorm -> parameter-free LayerNorm
  mask: per-example argsort of uniform noise, keep n = N * (1 - mask_ratio) patches
  student: CLS + the n visible patches (gathered *before* the patch embedding, as the JAX model)
  linear projector to the teacher's width; Smooth L1 (beta 1) on CLS + visible tokens
  backward, AdamW step.

Attention is ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU, the fused
CPU kernel on CPU). ``amp_dtype`` runs the forward passes under ``torch.autocast`` (bf16 on GPU) with
float32 master weights, the standard PyTorch mixed-precision recipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class Block(nn.Module):
  def __init__(self, dim: int, heads: int, mlp_dim: int):
    super().__init__()
    self.heads = heads
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.fc1 = nn.Linear(dim, mlp_dim)
    self.fc2 = nn.Linear(mlp_dim, dim)

  def forward(self, x):
    b, t, d = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, H, T, hd] each
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
    x = x + self.proj(y)
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
  """timm-layout ViT encoder whose patch embedding is a Linear on patchified pixels (the same
  matmul as timm's stride-p Conv2d), so visible patches can be gathered before embedding."""

  def __init__(self, width, depth, heads, mlp_dim, patch_size, image_size, channels=3):
    super().__init__()
    n = (image_size // patch_size) ** 2
    self.patch_embed = nn.Linear(patch_size * patch_size * channels, width)
    self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
    self.register_buffer('pos_embed', torch.randn(1, n + 1, width) * 0.02)  # fixed, as sin-cos
    self.blocks = nn.ModuleList(Block(width, heads, mlp_dim) for _ in range(depth))
    self.norm = nn.LayerNorm(width, eps=1e-6)

  def forward(self, patches, keep=None):
    """patches [B, N, p*p*C]; keep [B, n] visible indices or None -> tokens [B, 1 + n, D]."""
    pos = self.pos_embed[:, 1:].expand(patches.shape[0], -1, -1)
    if keep is not None:
      patches = torch.gather(patches, 1, keep[..., None].expand(-1, -1, patches.shape[-1]))
      pos = torch.gather(pos, 1, keep[..., None].expand(-1, -1, pos.shape[-1]))
    x = self.patch_embed(patches) + pos
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x)


def patchify(images, p: int):
  """[B, H, W, C] -> [B, N, p*p*C] in (row, col, channel) order, as moma_jax's patchify."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def build(arch: dict, device) -> ViT:
  """arch: width, depth, num_heads, mlp_dim, patch_size, image_size (moma_jax ViT fields)."""
  return ViT(
    arch['width'],
    arch['depth'],
    arch['num_heads'],
    arch['mlp_dim'],
    arch['patch_size'],
    arch['image_size'],
  ).to(device)


class MomaStep:
  """One training step: ``step(images_uint8) -> loss`` (a 0-d tensor, not synchronised)."""

  def __init__(
    self,
    student: dict,
    teacher: dict,
    mask_ratio: float,
    device: str = 'cpu',
    amp_dtype: torch.dtype | None = None,
    compile: bool = False,
    lr: float = 1e-4,
  ):
    self.device = torch.device(device)
    self.student = build(student, self.device)
    self.teacher = build(teacher, self.device).eval().requires_grad_(False)
    self.projector = nn.Linear(student['width'], teacher['width']).to(self.device)
    self.patch = student['patch_size']
    n_patches = (student['image_size'] // self.patch) ** 2
    self.keep = int(n_patches * (1 - mask_ratio))  # as moma_jax.masking.num_visible
    self.amp_dtype = amp_dtype
    self.mean = torch.tensor(MEAN, device=self.device) * 255
    self.std = torch.tensor(STD, device=self.device) * 255
    params = [*self.student.parameters(), *self.projector.parameters()]
    groups = [
      {'params': [p for p in params if p.ndim >= 2], 'weight_decay': 0.05},
      {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0},
    ]
    # The fused AdamW kernel is PyTorch's fastest eager optimizer (CPU and CUDA since 2.4).
    self.opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)
    self.forward_loss = torch.compile(self._forward_loss) if compile else self._forward_loss

  def _forward_loss(self, images):
    x = (images.float() - self.mean) / self.std
    patches = patchify(x, self.patch)
    b, n_all, _ = patches.shape
    autocast = torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None)
    with autocast:
      with torch.no_grad():
        t = self.teacher(patches)
        t = F.layer_norm(t.float(), t.shape[-1:], eps=1e-6)
      keep = torch.rand(b, n_all, device=patches.device).argsort(1)[:, : self.keep]
      pred = self.projector(self.student(patches, keep))
    tgt = torch.cat(
      [t[:, :1], torch.gather(t[:, 1:], 1, keep[..., None].expand(-1, -1, t.shape[-1]))], 1
    )
    return F.smooth_l1_loss(pred.float(), tgt, beta=1.0)

  def __call__(self, images):
    loss = self.forward_loss(images)
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss
