"""Optimizer and learning-rate schedules (the reference's defaults: AdamW, linear decay with warmup)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from .arguments import SchedulerType, TrainingArguments


def create_optimizer(model: torch.nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW; biases and normalisation weights (1-D parameters) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.weight_decay == 0:
        groups = [{"params": params, "weight_decay": 0.0}]  # one group: the same math, less per-step work
    else:
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay}]
        no_decay = [p for p in params if p.ndim < 2]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )


def create_scheduler(
    optimizer: torch.optim.Optimizer, args: TrainingArguments, num_training_steps: int
) -> LambdaLR:
    warmup = args.get_warmup_steps(num_training_steps)
    kind = args.lr_scheduler_type

    def factor(step: int) -> float:
        if kind == SchedulerType.CONSTANT:
            return 1.0
        if step < warmup:
            return step / max(1, warmup)
        if kind == SchedulerType.CONSTANT_WITH_WARMUP:
            return 1.0
        progress = (step - warmup) / max(1, num_training_steps - warmup)
        if kind == SchedulerType.LINEAR:
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine

    return LambdaLR(optimizer, factor)
