"""``STDHAttention``: a drop-in replacement for timm's ``Attention`` with STDHA (SPEC §2)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..offsets import HeadOffsets, check_offsets, resolve_offsets
from ..ops.stdha import stdha_attention, stdha_attention_packed


class STDHAttention(nn.Module):
    """Multi-head self-attention whose heads may read K/V from another frame of the same clip.

    Parameter and submodule names are timm's (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``proj``),
    so a timm ``Attention`` state dict loads unchanged and the module adds no parameters.

    Input ``(B*T, N, C)`` with the ``T`` frames of each video adjacent. ``head_offsets`` is a list
    of ``num_heads`` ints or a preset name (``"vit_b"``, ``"vit_l"``, … see
    :data:`zeroi2v.offsets.PRESETS`). ``backend`` is passed to :func:`zeroi2v.stdha_attention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        num_frames: int,
        head_offsets: HeadOffsets = "auto",
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[type] = None,
        head_dim: Optional[int] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            norm_layer = nn.LayerNorm
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = None
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = backend
        self.set_temporal(num_frames, head_offsets)

    def set_temporal(self, num_frames: int, head_offsets: HeadOffsets) -> None:
        """Change the clip length and/or the head offsets (validated: ``|d| < num_frames``)."""
        offsets = resolve_offsets(head_offsets, self.num_heads, num_frames)
        check_offsets(offsets, num_frames)
        self.num_frames, self.head_offsets = int(num_frames), offsets

    @classmethod
    def from_timm(cls, attn: nn.Module, num_frames: int, head_offsets: HeadOffsets = "auto",
                  backend: str = "auto") -> "STDHAttention":
        """Wrap a timm ``Attention``: its submodules (and so its weights) are reused, not copied."""
        for name in ("qkv", "proj", "num_heads", "head_dim"):
            if not hasattr(attn, name):
                raise UnsupportedModelError(
                    f"{type(attn).__name__} is not a timm Attention (no '{name}'); "
                    "STDHAttention.from_timm needs the standard fused-qkv attention"
                )
        if getattr(attn, "qkv", None) is None or not isinstance(attn.qkv, nn.Linear):
            raise UnsupportedModelError(f"{type(attn).__name__} has no fused nn.Linear qkv projection")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.head_dim = attn.num_heads, attn.head_dim
        new.attn_dim = attn.num_heads * attn.head_dim
        new.scale = attn.head_dim ** -0.5
        new.qkv = attn.qkv
        new.q_norm = getattr(attn, "q_norm", nn.Identity())
        new.k_norm = getattr(attn, "k_norm", nn.Identity())
        new.attn_drop = getattr(attn, "attn_drop", nn.Dropout(0.0))
        new.norm = getattr(attn, "norm", nn.Identity())
        new.gate = getattr(attn, "gate", None)
        new.proj = attn.proj
        new.proj_drop = getattr(attn, "proj_drop", nn.Dropout(0.0))
        new.backend = backend
        new.set_temporal(num_frames, head_offsets)
        return new

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, num_frames: Optional[int] = None, *,
                qkv_fn: Optional[Callable] = None, proj_fn: Optional[Callable] = None) -> torch.Tensor:
        """``qkv_fn(x)`` replaces ``self.qkv(x)`` and ``proj_fn(x)`` replaces
        ``self.proj_drop(self.proj(x))`` when given (the fused adapter ops of ZeroI2VBlock)."""
        if attn_mask is not None or is_causal:
            raise ValueError("STDHAttention does not support attn_mask / is_causal")
        if x.dim() != 3:
            raise ValueError(f"STDHAttention expects (B*T, N, C) input, got shape {tuple(x.shape)}")
        bt, n, _ = x.shape
        t = self.num_frames if num_frames is None else num_frames
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = (self.qkv if qkv_fn is None else qkv_fn)(x)
        qkv = qkv.reshape(bt, n, 3, self.num_heads, self.head_dim)
        kw = dict(scale=self.scale, dropout_p=self.attn_drop.p if self.training else 0.0,
                  backend=self.backend,
                  inplace_kv=True)  # k, v are this call's own qkv activations
        if isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity):
            # q, k, v stay views of qkv: no copy up to the output projection, nor back
            x = stdha_attention_packed(qkv, t, self.head_offsets, **kw)
        else:  # normalised q, k are new tensors
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            x = stdha_attention(q, k, v, t, self.head_offsets, **kw)
            x = x.transpose(1, 2).reshape(bt, n, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        if proj_fn is not None:
            return proj_fn(x)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_frames={self.num_frames}, "
                f"head_offsets={list(self.head_offsets)}, backend={self.backend!r}")
