"""PyTorch references for DINO / MOKD, written in the tests from the official definitions:
torchvision's ResNet (exact module and state-dict names; torchvision itself does not import here),
DINO's head and loss, DINO's position-embedding interpolation, MOKD's TransHeads (THead_CNN /
THead_ViT) and search loss. Tests only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch_reference import Block, PatchEmbed


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride on the 3x3
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class ResNet(nn.Module):
  """torchvision.models.resnet.ResNet (groups 1, width 64 per group by default); ``small_stem``
  swaps the stem for a 3x3 stride-1 conv without max-pool (our tiny variants)."""

  def __init__(self, block, layers, num_classes=1000, width=64, small_stem=False):
    super().__init__()
    self.inplanes = width
    if small_stem:
      self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    else:
      self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.small_stem = small_stem
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(block, width, layers[0])
    self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
    self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
    self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(width * 8 * block.expansion, num_classes) if num_classes else nn.Identity()

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
        nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
        nn.BatchNorm2d(planes * block.expansion),
      )
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward_features(self, x):
    x = self.relu(self.bn1(self.conv1(x)))
    if not self.small_stem:
      x = self.maxpool(x)
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1), x  # (pooled, layer-4 map), as MOKD's backbone

  def forward(self, x):
    return self.fc(self.forward_features(x)[0])

  @torch.no_grad()
  def randomize(self, seed=0):
    """Non-trivial BatchNorm affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in self.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))
    return self


def resnet50(num_classes=1000):
  return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


class DINOHead(nn.Module):
  """DINO's head (use_bn=False)."""

  def __init__(self, in_dim, out_dim, nlayers=3, hidden_dim=2048, bottleneck_dim=256):
    super().__init__()
    layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
      layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    self.mlp = nn.Sequential(*layers)
    self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    self.last_layer.weight_g.data.fill_(1)

  def forward(self, x):
    x = nn.functional.normalize(self.mlp(x), dim=-1, p=2)
    return self.last_layer(x)


class DINOLoss(nn.Module):
  """DINO's loss (single process: the all-reduce of the center is the identity)."""

  def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
               warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9):  # fmt: skip
    super().__init__()
    self.student_temp = student_temp
    self.center_momentum = center_momentum
    self.ncrops = ncrops
    self.register_buffer('center', torch.zeros(1, out_dim))
    self.teacher_temp_schedule = np.concatenate((
      np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
      np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))  # fmt: skip

  def forward(self, student_output, teacher_output, epoch):
    student_out = (student_output / self.student_temp).chunk(self.ncrops)
    temp = self.teacher_temp_schedule[epoch]
    teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
      for v in range(len(student_out)):
        if v == iq:
          continue
        loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
        total_loss += loss.mean()
        n_loss_terms += 1
    total_loss /= n_loss_terms
    with torch.no_grad():
      batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
      self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
    return total_loss


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations=3):
  """DINOv2's DINOLoss.sinkhorn_knopp_teacher (dinov2/loss/dino_clstoken_loss.py), one process
  (its all-reduces are the identity)."""
  teacher_output = teacher_output.float()
  Q = torch.exp(teacher_output / teacher_temp).t()  # noqa: N806  (DINOv2's names)
  B = Q.shape[1]  # noqa: N806
  K = Q.shape[0]  # noqa: N806
  Q /= torch.sum(Q)
  for _ in range(n_iterations):
    Q /= torch.sum(Q, dim=1, keepdim=True)
    Q /= K
    Q /= torch.sum(Q, dim=0, keepdim=True)
    Q /= B
  Q *= B
  return Q.t()


def ct_search_loss(student, teacher, temp, student_temp=0.1):
  """MOKD's CTSearchLoss."""
  t = F.softmax(teacher / temp, dim=-1)
  return torch.sum(-t * F.log_softmax(student / student_temp, dim=-1), dim=-1).mean()


def interpolate_grid(pos, w):
  """DINO's / MOKD's interpolate_pos_encoding on a [1, N, D] grid (no CLS) to w x w."""
  n = pos.shape[1]
  if n == w * w:
    return pos
  s, dim = int(math.sqrt(n)), pos.shape[-1]
  w0 = w + 0.1
  out = F.interpolate(
    pos.reshape(1, s, s, dim).permute(0, 3, 1, 2), scale_factor=(w0 / s, w0 / s), mode='bicubic'
  )
  return out.permute(0, 2, 3, 1).reshape(1, -1, dim)


class THead(nn.Module):
  """MOKD's THead_CNN (in_chans > 0) / THead_ViT (in_chans == 0)."""

  def __init__(self, out_dim, featuremap_size, embed_dim, depth, num_heads, in_chans=0):
    super().__init__()
    self.in_chans = in_chans
    if in_chans:
      self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=1, stride=1)
    self.pos_embed = nn.Parameter(torch.randn(1, featuremap_size**2, embed_dim) * 0.02)
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.last_layer = nn.utils.weight_norm(nn.Linear(embed_dim, out_dim, bias=False))
    self.last_layer.weight_g.data.fill_(1)

  def forward(self, x, query_token=None):
    x_pool = None
    if self.in_chans:
      x = self.patch_embed(x)
      x_pool = x.mean(dim=(2, 3))
      side = x.shape[-1]
      x = x.flatten(2).transpose(1, 2)
    else:
      side = int(math.sqrt(x.shape[1]))
    x = x + interpolate_grid(self.pos_embed, side)
    if query_token is not None:
      x = torch.cat((query_token.unsqueeze(1), x), dim=1)
    for blk in self.blocks:
      x = blk(x)
    x = self.norm(x)
    if query_token is not None:
      x = x[:, 1:]
    x = self.last_layer(torch.mean(x, dim=1))
    return x, x_pool


def load_flax(module: nn.Module, variables, prefix: str = '') -> None:
  """Copies Flax variables into a torch module through the converter's name mapping."""
  from convert import layouts

  state = {prefix + k: torch.from_numpy(np.array(v)) for k, v in
           layouts.flax_to_torch(variables).items()}  # fmt: skip
  missing, unexpected = module.load_state_dict(state, strict=False)
  missing = [k for k in missing if not k.endswith('num_batches_tracked')]
  assert not missing and not unexpected, (missing, unexpected)


# --- a whole DINO training step, as main_dino.py runs it ------------------------------------------


class DinoViT(nn.Module):
  """DINO's VisionTransformer over torch_reference's blocks: DINO's initialisation (trunc-normal
  0.02 linears and learned position embeddings / CLS, zero biases, unit norms; the patch conv keeps
  torch's default) and any crop size (position embeddings resized by ``interpolate_grid``)."""

  def __init__(self, patch, dim, depth, heads, grid, pool='cls'):
    super().__init__()
    self.patch, self.pool = patch, pool
    self.patch_embed = PatchEmbed(patch, dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
    self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    for name, p in self.named_parameters():
      if name.startswith('patch_embed'):
        continue
      if p.ndim > 1:
        nn.init.trunc_normal_(p, std=0.02)
      elif name.endswith('bias'):
        nn.init.zeros_(p)
      else:
        nn.init.ones_(p)

  def forward(self, x):
    """x [B, 3, S, S] -> the CLS token after the final norm (``pool='mean'``: mean patch token)."""
    t = self.patch_embed(x) + interpolate_grid(self.pos_embed[:, 1:], x.shape[-1] // self.patch)
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(t.shape[0], -1, -1)
    t = torch.cat([cls, t], 1)
    for block in self.blocks:
      t = block(t)
    t = self.norm(t)
    return t[:, 1:].mean(1) if self.pool == 'mean' else t[:, 0]


class MultiCropWrapper(nn.Module):
  """DINO's MultiCropWrapper: crops of one size through the backbone together, then the head."""

  def __init__(self, backbone, head):
    super().__init__()
    self.backbone, self.head = backbone, head

  def forward(self, crops):
    feats, i = [], 0
    while i < len(crops):
      j = i
      while j < len(crops) and crops[j].shape[-1] == crops[i].shape[-1]:
        j += 1
      feats.append(self.backbone(torch.cat(crops[i:j])))
      i = j
    return self.head(torch.cat(feats))


def cosine_scheduler(base, final, total, warmup=0):
  """DINO's utils.cosine_scheduler, per step."""
  warm = np.linspace(0, base, warmup) if warmup else np.array([])
  iters = np.arange(total - warmup)
  return np.concatenate(
    (warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters))))
  )


class DinoTraining:
  """main_dino.py's train_one_epoch for a ViT: AdamW with DINO's two parameter groups, per-step lr
  / weight-decay / momentum schedules, per-tensor gradient clipping, the last layer's gradient
  cancelled during the first ``freeze_last_layer`` epochs, ``norm_last_layer`` (weight_g frozen),
  the teacher updated by EMA after each step. The teacher starts as a copy of the student."""

  def __init__(self, student, teacher, loss_fn, lr, wd, momentum, steps_per_epoch, clip=3.0,
               freeze_last_layer=1):  # fmt: skip
    self.student, self.teacher, self.loss_fn = student, teacher, loss_fn
    self.lr, self.wd, self.momentum = lr, wd, momentum
    self.steps_per_epoch, self.clip, self.freeze = steps_per_epoch, clip, freeze_last_layer
    teacher.load_state_dict(student.state_dict())  # (weight_norm modules cannot be deep-copied)
    for p in teacher.parameters():
      p.requires_grad = False
    student.head.last_layer.weight_g.requires_grad = False
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if not n.endswith('.bias') and p.ndim > 1]
    no_decay = [p for n, p in params if n.endswith('.bias') or p.ndim == 1]
    self.opt = torch.optim.AdamW([{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}])

  def step(self, it, crops):
    """One iteration ``it`` on crops (2 global first): (loss, the teacher's logits [2B, K])."""
    for i, group in enumerate(self.opt.param_groups):
      group['lr'] = self.lr[it]
      if i == 0:
        group['weight_decay'] = self.wd[it]
    epoch = it // self.steps_per_epoch
    with torch.no_grad():
      t_out = self.teacher(crops[:2])
    loss = self.loss_fn(self.student(crops), t_out, epoch)
    self.opt.zero_grad()
    loss.backward()
    for p in self.student.parameters():  # utils.clip_gradients
      if p.grad is not None:
        coef = self.clip / (p.grad.norm(2) + 1e-6)
        if coef < 1:
          p.grad.mul_(coef)
    if epoch < self.freeze:  # utils.cancel_gradients_last_layer
      self.student.head.last_layer.weight_v.grad = None
    self.opt.step()
    with torch.no_grad():
      m = self.momentum[it]
      for ps, pt in zip(self.student.parameters(), self.teacher.parameters(), strict=True):
        pt.mul_(m).add_((1 - m) * ps.detach())
    return loss.item(), t_out
