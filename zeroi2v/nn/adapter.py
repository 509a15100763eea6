"""The linear adapter of ZeroI2V (SPEC §3): a bottleneck with no nonlinearity, so it can be merged."""
from __future__ import annotations

import torch
from torch import nn


class LinearAdapter(nn.Module):
    """``x + s * fc2(dropout(fc1(x)))`` with ``fc1: C -> C*r`` and ``fc2: C*r -> C``.

    ``fc2`` starts at zero, so a freshly adapted model computes exactly the image model. Being
    affine, the adapter is ``x M^T + c`` with ``M = I + s W2 W1`` and ``c = s (W2 b1 + b2)``
    (:meth:`affine`), which :func:`zeroi2v.merge_adapters` folds into the neighbouring linear.
    """

    def __init__(self, dim: int, ratio: float = 0.25, scale: float = 0.5, dropout: float = 0.1,
                 device=None, dtype=None):
        super().__init__()
        hidden = max(1, int(round(dim * ratio)))
        self.dim, self.hidden, self.scale = dim, hidden, float(scale)
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.fc1.weight, std=0.02)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.fc2(self.drop(self.fc1(x)))

    @torch.no_grad()
    def affine(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, c)`` such that ``adapter(x) == x @ M.T + c`` in eval mode, computed in ``dtype``."""
        w1, b1 = self.fc1.weight.to(dtype), self.fc1.bias.to(dtype)
        w2, b2 = self.fc2.weight.to(dtype), self.fc2.bias.to(dtype)
        m = torch.eye(self.dim, dtype=dtype, device=w1.device) + self.scale * (w2 @ w1)
        c = self.scale * (w2 @ b1 + b2)
        return m, c

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, scale={self.scale}"
