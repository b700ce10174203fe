"""Objectives of the one trainer. Each is a frozen dataclass with pure functions:

  init(rng, pretrained) -> (params, extra)         trainable params; extra = non-trained state
                                                   (BatchNorm statistics, EMA weights, ...)
  loss(params, extra, frozen, batch, rng) -> (loss, (metrics, new_extra))
  features(params, extra, frozen, images) -> [B, D] features for k-NN (uint8 images in)
  required_views() -> set of data view names the loss reads
  frozen_pattern -> regex of parameter paths the optimizer must not update (or None)
  lr_groups (optional) -> ((regex, lr multiplier, steps held at lr 0), ...): parameter groups on
                          schedules of their own (AdamW; MOMA's projector warm-up)
  flops_per_example() -> model FLOPs of one training example (for MFU)

``frozen`` holds what is used but never trained (teachers, a probed encoder): a jit argument,
sharded once, never in the optimizer state or in checkpoints.
"""
