"""The linear adapter of ZeroI2V (docs/method.md §3): a bottleneck with no nonlinearity, so it can be merged,
and the adapted linear that carries one next to a frozen layer."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.adapter import adapted_linear


class SharedOutput(NamedTuple):
    """What :meth:`LinearAdapter.shared_forward` keeps between the readers of one input."""

    input: torch.Tensor
    output: torch.Tensor
    readers_left: int


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

    def shared_forward(self, x: torch.Tensor, readers: int) -> torch.Tensor:
        """``self(x)`` for ``readers`` linears that read the same input one after another (the
        q, k and v projections of one attention; the two input projections of a SwiGLU MLP).

        The first call computes it; the next ``readers - 1`` calls with this same tensor object
        get that result back, so all readers see one dropout draw and one autograd node, as for
        the paper's single adapter before the whole attention / MLP. The module holds
        :class:`SharedOutput` (input, output, calls left) only while a reader is still to come: no
        activation outlives the last one. A call with another tensor starts over.
        """
        pending = getattr(self, "_shared_output", None)
        if pending is not None and pending.input is x:
            y, left = pending.output, pending.readers_left - 1
        else:
            y, left = self(x), readers - 1
        self._shared_output = SharedOutput(x, y, left) if left > 0 else None
        return y

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


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` with a :class:`LinearAdapter` right before (``position="before"``:
    ``linear(adapter(x))``) or right after it (``"after"``: ``adapter(linear(x))``).

    It stands where the linear stood in a timm model and keeps its parameter names (``weight``,
    ``bias``; the adapter's are ``adapter.fc1.*``, ``adapter.fc2.*``), so the model's own forward
    code runs unchanged and, once merged (:meth:`to_linear`), its state dict is timm's again.
    ``fused`` chooses the fused adapter + linear op (:func:`zeroi2v.ops.adapter.adapted_linear`:
    ``None`` automatic, ``True``, ``False``).

    One adapter may feed several linears that read the same input (the q, k and v projections of
    an attention with separate projections; the two input projections of a SwiGLU MLP): it is a
    submodule of the first (``shared=False``) and only referenced by the others (``shared=True``),
    so it is one set of parameters, stored once. ``sites`` is how many linears share it: the
    adapter then runs once per input for all of them (:meth:`LinearAdapter.shared_forward`: one dropout
    mask, as for one adapter before the whole attention / MLP) and those linears take the plain
    path, not the fused op.
    """

    def __init__(self, linear: nn.Linear, adapter: LinearAdapter, position: str,
                 shared: bool = False, sites: int = 1):
        super().__init__()
        if type(linear) is not nn.Linear:
            raise TypeError(f"AdaptedLinear wraps an nn.Linear, got {type(linear).__name__}")
        if position not in ("before", "after"):
            raise ValueError(f"position must be 'before' or 'after', got {position!r}")
        want = linear.in_features if position == "before" else linear.out_features
        if adapter.dim != want:
            raise ValueError(f"an adapter of dim {adapter.dim} cannot go {position} a linear "
                             f"{linear.in_features} -> {linear.out_features}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        if sites > 1 and position != "before":
            raise ValueError("only an adapter before its linears can be shared by several")
        self.position, self.shared, self.sites = position, bool(shared), int(sites)
        if shared:
            self.__dict__["_shared_adapter"] = adapter  # not a submodule: owned by another linear
        else:
            self.adapter = adapter
        self.fused: Optional[bool] = None

    def get_adapter(self) -> LinearAdapter:
        return self.__dict__["_shared_adapter"] if self.shared else self.adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sites > 1:  # the adapter runs once for all its linears (plain path, not fused)
            return F.linear(self.get_adapter().shared_forward(x, self.sites), self.weight,
                            self.bias)
        return adapted_linear(x, self.weight, self.bias, self.get_adapter(), self.position,
                              fused=self.fused)

    @torch.no_grad()
    def to_linear(self, constant: bool = True) -> nn.Linear:
        """The merged ``nn.Linear`` (docs/method.md §3): with ``(M, c)`` the adapter's affine map, ``W M``
        and ``W c + b`` before, ``M W`` and ``M b + c`` after; in float64, cast back to the
        weight's dtype. A bias-free linear gets a bias. ``constant=False`` (an adapter before the
        linear only) leaves ``c`` out, for a caller that has moved it into the input, and keeps
        the linear's bias as it is."""
        m, c = self.get_adapter().affine(torch.float64)
        if not constant:
            if self.position != "before":
                raise ValueError("only an adapter before a linear can leave its constant out")
            out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                            device=self.weight.device, dtype=self.weight.dtype)
            out.weight.copy_((self.weight.double() @ m).to(self.weight.dtype))
            out.weight.requires_grad_(self.weight.requires_grad)
            if self.bias is not None:
                out.bias.copy_(self.bias)
                out.bias.requires_grad_(False)
            return out
        w = self.weight.double()
        b = self.bias.double() if self.bias is not None else torch.zeros(
            self.out_features, dtype=torch.float64, device=w.device)
        if self.position == "before":
            w2, b2 = w @ m, w @ c + b
        else:
            w2, b2 = m @ w, m @ b + c
        out = nn.Linear(self.in_features, self.out_features, device=self.weight.device,
                        dtype=self.weight.dtype)
        out.weight.copy_(w2.to(self.weight.dtype))
        out.bias.copy_(b2.to(self.weight.dtype))
        out.weight.requires_grad_(self.weight.requires_grad)
        out.bias.requires_grad_(False)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, adapter {self.position}"
                + (" (shared)" if self.shared else ""))
