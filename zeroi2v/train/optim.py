"""AdamW with the recipe's parameter groups, linear LR scaling, warm-up + cosine schedule
(docs/method.md §4)."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

# Parameter-name fragments that never get weight decay: embeddings, norms and scales (docs/method.md §4).
NO_DECAY_KEYS = ("temporal_embedding", "pos_embed", "cls_token", "reg_token", "dist_token",
                 "class_embedding", "positional_embedding", "norm", "ln_", "scale", "gamma")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for 1-D parameters (biases, norm weights) and for embeddings, norms and scales."""
    if param.ndim <= 1:
        return True
    leaf = name.split(".")
    return any(k in part for part in leaf for k in NO_DECAY_KEYS)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed and a non-decayed group (names kept for tests)."""
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_weight_decay(name, p):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "names": no_decay_names})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def scaled_lr(lr: float, global_batch: int, ref_batch: int, enabled: bool = True) -> float:
    """Linear scaling rule: ``lr * global_batch / ref_batch``."""
    if not enabled:
        return float(lr)
    if global_batch < 1 or ref_batch < 1:
        raise ValueError(f"batch sizes must be positive, got {global_batch} and {ref_batch}")
    return float(lr) * global_batch / ref_batch


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05,
                    betas: Iterable[float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    # AdamW ignores unknown group keys such as "names"; keep them for inspection.
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def warmup_cosine_factor(it: int, total: int, warmup: int, start_factor: float = 0.1,
                         min_factor: float = 0.0) -> float:
    """LR multiplier at optimiser step ``it`` (0-based) of ``total``.

    Linear from ``start_factor`` to 1 over the first ``warmup`` steps, then a half cosine from 1 to
    ``min_factor`` at step ``total``.
    """
    if total < 1:
        raise ValueError(f"total steps must be >= 1, got {total}")
    warmup = max(0, min(int(warmup), total))
    if it < warmup:
        return start_factor + (1.0 - start_factor) * it / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (it - warmup) / span)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR:
    """Per-iteration scheduler: call :meth:`step` after every optimiser step.

    ``base_lrs`` are the groups' ``lr`` at construction (stored as ``initial_lr``); ``min_lr`` is an
    absolute floor reached at the end of training.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 start_factor: float = 0.1, min_lr: float = 0.0):
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.start_factor = float(start_factor)
        self.min_lr = float(min_lr)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def lr_at(self, it: int) -> list[float]:
        out = []
        for base in self.base_lrs:
            min_factor = self.min_lr / base if base > 0 else 0.0
            out.append(base * warmup_cosine_factor(it, self.total_steps, self.warmup_steps,
                                                   self.start_factor, min_factor))
        return out

    def _apply(self) -> None:
        for g, lr in zip(self.optimizer.param_groups, self.lr_at(self.last_step)):
            g["lr"] = lr

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def set_total_steps(self, total_steps: int) -> None:
        """End the schedule at ``total_steps`` from here on (a run extended on resume); the
        groups' learning rates follow at once."""
        self.total_steps = int(total_steps)
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "start_factor": self.start_factor, "min_lr": self.min_lr,
                "base_lrs": list(self.base_lrs), "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        for k in ("total_steps", "warmup_steps", "start_factor", "min_lr", "last_step"):
            setattr(self, k, state[k])
        self.base_lrs = list(state["base_lrs"])
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = base
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int,
                    warmup_epochs: float = 0.0, start_factor: float = 0.1,
                    min_lr: float = 0.0) -> WarmupCosineLR:
    total = int(epochs) * int(steps_per_epoch)
    warmup = int(round(float(warmup_epochs) * steps_per_epoch))
    return WarmupCosineLR(optimizer, total, warmup, start_factor, min_lr)
