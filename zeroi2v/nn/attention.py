"""STDHA attention modules (docs/method.md §2): drop-in replacements for timm's attention classes.

* :class:`STDHAttention` — timm's ``Attention`` (ViT, DeiT, CLIP, DINOv2, SigLIP, AIMv2 ...);
* :class:`STDHEvaAttention` — timm's ``EvaAttention`` (EVA-02, EVA-CLIP, DINOv3, RoPE reg ViTs):
  fused qkv with separate q/v biases, or separate q/k/v projections; q/k norms; rotary position
  embeddings, applied per frame to q and k *before* the temporal gather, so a temporal head
  compares its frame's queries with the source frame's keys at the same positions;
* :class:`STDHBeitAttention` — BEiT's ``Attention``: q/v biases, a relative position bias added
  to the logits of every head (it depends on token positions only, not on the frame read).

Each keeps the timm module's submodules and parameter names (a timm state dict loads
unchanged; no parameters are added) and replaces only the attention itself with
:func:`zeroi2v.stdha_attention`. :func:`stdha_from_timm` picks the class for a timm module.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..offsets import HeadOffsets, check_offsets, resolve_offsets
from ..ops.stdha import qkv_views, stdha_attention, stdha_attention_packed

_REUSED = ("qkv", "q_proj", "k_proj", "v_proj", "q_bias", "v_bias", "q_norm", "k_norm", "norm",
           "gate", "attn_drop", "proj", "proj_drop", "relative_position_bias_table")


class _STDHABase(nn.Module):
    """What every STDHA attention has: heads, the clip length and the head offsets, a backend.
    ``timm_class`` names (dotted path) the timm attention class it replaces."""

    num_heads: int
    head_dim: int
    timm_class: str = ""

    def set_temporal(self, num_frames: int, head_offsets: HeadOffsets) -> None:
        """Change the clip length and/or the head offsets (validated: ``|d| < num_frames``)."""
        offsets = resolve_offsets(head_offsets, self.num_heads, num_frames)
        check_offsets(offsets, num_frames)
        self.num_frames, self.head_offsets = int(num_frames), offsets

    @classmethod
    def _adopted(cls, attn: nn.Module, num_frames: int, head_offsets: HeadOffsets, backend: str,
                 optional: tuple[str, ...] = ()):
        """A new module that has taken over ``attn``'s parts; ``optional`` names attributes set
        to None where ``attn`` has none of them."""
        new = cls.__new__(cls)
        new._adopt(attn, num_frames, head_offsets, backend)
        for name in optional:
            if not hasattr(new, name):
                setattr(new, name, None)
        return new

    def _adopt(self, attn: nn.Module, num_frames: int, head_offsets: HeadOffsets,
               backend: str) -> None:
        """Take over ``attn``'s submodules, parameters and buffers (shared, not copied)."""
        nn.Module.__init__(self)
        self.num_heads = int(attn.num_heads)
        head_dim = getattr(attn, "head_dim", None)
        if head_dim is None:  # BEiT's attention keeps only its qkv projection's size
            head_dim = attn.qkv.out_features // (3 * self.num_heads)
        self.head_dim = int(head_dim)
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = float(getattr(attn, "scale", self.head_dim ** -0.5))
        for name in _REUSED:
            if name in attn._modules:
                self._modules[name] = attn._modules[name]
            elif name in attn._parameters:
                self._parameters[name] = attn._parameters[name]
        for name, buf in attn._buffers.items():
            self.register_buffer(name, buf, persistent=name not in attn._non_persistent_buffers_set)
        for name in ("q_norm", "k_norm", "norm"):
            if name not in self._modules:
                self._modules[name] = nn.Identity()
        if "attn_drop" not in self._modules:
            self.attn_drop = nn.Dropout(0.0)
        if "proj_drop" not in self._modules:
            self.proj_drop = nn.Dropout(0.0)
        if "gate" not in self._modules:
            self.gate = None
        self.backend = backend
        self.set_temporal(num_frames, head_offsets)

    def _attend(self, q, k, v, num_frames: Optional[int], attn_bias=None) -> torch.Tensor:
        """STDHA of ``(B*T, H, N, D)`` q, k, v (this call's own activations) -> ``(B*T, N, H*D)``."""
        t = self.num_frames if num_frames is None else num_frames
        x = stdha_attention(q, k, v, t, self.head_offsets, scale=self.scale,
                            dropout_p=self.attn_drop.p if self.training else 0.0,
                            attn_bias=attn_bias, backend=self.backend, inplace_kv=True)
        return x.transpose(1, 2).flatten(2)

    def _output(self, x: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    @staticmethod
    def _check_input(x: torch.Tensor, attn_mask, is_causal) -> None:
        if attn_mask is not None or is_causal:
            raise ValueError("STDHA attention does not take attn_mask / is_causal: its heads "
                             "attend within a frame or to a whole neighbouring frame")
        if x.dim() != 3:
            raise ValueError(f"STDHA attention expects (B*T, N, C) input, got shape "
                             f"{tuple(x.shape)}")

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_frames={self.num_frames}, "
                f"head_offsets={list(self.head_offsets)}, backend={self.backend!r}")


class STDHAttention(_STDHABase):
    """Multi-head self-attention whose heads may read K/V from another frame of the same clip.

    Parameter and submodule names are timm's ``Attention``'s (``qkv``, ``q_norm``, ``k_norm``,
    ``norm``, ``proj``), so a timm state dict loads unchanged and the module adds no parameters.

    Input ``(B*T, N, C)`` with the ``T`` frames of each video adjacent. ``head_offsets``: one int
    per head, or a layout name (``"auto"``, ``"spatial"``, a preset such as ``"vit_b"``, see
    :mod:`zeroi2v.offsets`). ``backend`` is passed to :func:`zeroi2v.stdha_attention`.
    """

    timm_class = "timm.layers.Attention"

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

    @classmethod
    def from_timm(cls, attn: nn.Module, num_frames: int, head_offsets: HeadOffsets = "auto",
                  backend: str = "auto") -> STDHAttention:
        """Wrap a timm ``Attention``: its submodules (and so its weights) are reused, not copied."""
        for name in ("qkv", "proj", "num_heads", "head_dim"):
            if getattr(attn, name, None) is None:
                raise UnsupportedModelError(
                    f"{type(attn).__name__} is not a timm Attention (no '{name}'); "
                    "STDHAttention.from_timm needs the standard fused-qkv attention")
        return cls._adopted(attn, num_frames, head_offsets, backend)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, num_frames: Optional[int] = None) -> torch.Tensor:
        self._check_input(x, attn_mask, is_causal)
        bt, n, _ = x.shape
        t = self.num_frames if num_frames is None else num_frames
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(bt, n, 3, self.num_heads, self.head_dim)
        if isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity):
            # q, k, v stay views of qkv: no copy up to the output projection, nor back
            x = stdha_attention_packed(qkv, t, self.head_offsets, scale=self.scale,
                                       dropout_p=self.attn_drop.p if self.training else 0.0,
                                       backend=self.backend, inplace_kv=True)
        else:  # normalised q, k are new tensors
            q, k, v = qkv_views(qkv)
            x = self._attend(self.q_norm(q), self.k_norm(k), v, t)
        return self._output(x, gate)


class STDHEvaAttention(_STDHABase):
    """timm's ``EvaAttention`` with STDHA (see the module doc); built with :meth:`from_timm`."""

    timm_class = "timm.models.eva.EvaAttention"

    @classmethod
    def from_timm(cls, attn: nn.Module, num_frames: int, head_offsets: HeadOffsets = "auto",
                  backend: str = "auto") -> STDHEvaAttention:
        new = cls._adopted(attn, num_frames, head_offsets, backend,
                           optional=("qkv", "q_proj", "k_proj", "v_proj", "q_bias", "v_bias"))
        new.num_prefix_tokens = int(getattr(attn, "num_prefix_tokens", 1))
        new.rotate_half = bool(getattr(attn, "rotate_half", False))
        new.qkv_bias_separate = bool(getattr(attn, "qkv_bias_separate", False))
        if new.qkv is None and new.q_proj is None:
            raise UnsupportedModelError(f"{type(attn).__name__} has neither qkv nor q/k/v "
                                        "projections")
        return new

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                num_frames: Optional[int] = None) -> torch.Tensor:
        from timm.layers import apply_rot_embed_cat

        self._check_input(x, attn_mask, is_causal)
        bt, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            qkv = self.qkv(x)
            if self.q_bias is not None:
                qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
            q, k, v = qkv_views(qkv.reshape(bt, n, 3, self.num_heads, -1))
        else:
            q, k, v = (p(x).reshape(bt, n, self.num_heads, -1).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt = self.num_prefix_tokens
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope,
                                                              half=self.rotate_half)], dim=2)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope,
                                                              half=self.rotate_half)], dim=2)
            q, k = q.type_as(v), k.type_as(v)
        return self._output(self._attend(q, k, v, num_frames), gate)


class STDHBeitAttention(_STDHABase):
    """BEiT's ``Attention`` with STDHA (see the module doc); built with :meth:`from_timm`."""

    timm_class = "timm.models.beit.Attention"

    @classmethod
    def from_timm(cls, attn: nn.Module, num_frames: int, head_offsets: HeadOffsets = "auto",
                  backend: str = "auto") -> STDHBeitAttention:
        new = cls._adopted(attn, num_frames, head_offsets, backend,
                           optional=("q_bias", "v_bias", "relative_position_bias_table"))
        new.window_size = getattr(attn, "window_size", None)
        return new

    def rel_pos_bias(self) -> Optional[torch.Tensor]:
        if self.relative_position_bias_table is None:
            return None
        from timm.models.beit import Attention

        return Attention._get_rel_pos_bias(self)

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None,
                num_frames: Optional[int] = None) -> torch.Tensor:
        self._check_input(x, None, False)
        bt, n, _ = x.shape
        qkv = self.qkv(x)
        if self.q_bias is not None:
            qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = qkv_views(qkv.reshape(bt, n, 3, self.num_heads, -1))
        bias = self.rel_pos_bias()
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        return self._output(self._attend(q, k, v, num_frames, attn_bias=bias), None)

    @torch.no_grad()
    def absorb_qkv_bias(self) -> None:
        """After a merge gave ``qkv`` a bias: move its q and v parts into ``q_bias``/``v_bias``
        and drop the k part, so the module has BEiT's own parameters again. Exact: a bias on the
        keys adds ``q_i . b`` to every logit of query ``i``, which softmax ignores (no rotary
        embedding or key norm here changes that)."""
        if self.qkv.bias is None:
            return
        if self.q_bias is None:  # a qkv_bias=False model: give it BEiT's own (zero) biases
            w = self.qkv.weight
            self.q_bias = nn.Parameter(torch.zeros(self.attn_dim, dtype=w.dtype, device=w.device),
                                       requires_grad=False)
            self.v_bias = nn.Parameter(torch.zeros_like(self.q_bias), requires_grad=False)
            self.register_buffer("k_bias", torch.zeros_like(self.q_bias), persistent=False)
        b = self.qkv.bias.to(self.q_bias.dtype)
        c = self.attn_dim
        self.q_bias.add_(b[:c])
        self.v_bias.add_(b[2 * c:])
        self.qkv.bias = None


#: Every STDHA attention class; each names the timm class it replaces.
STDHA_CLASSES = (STDHAttention, STDHEvaAttention, STDHBeitAttention)


def stdha_class_for(attn: nn.Module) -> type[_STDHABase]:
    """The STDHA class for a timm attention module (the one whose ``timm_class`` it is), or an
    :class:`UnsupportedModelError` that names its class."""
    name = f"{type(attn).__module__}.{type(attn).__qualname__}"
    for ours in STDHA_CLASSES:
        module, cls = ours.timm_class.rsplit(".", 1)
        if type(attn) is getattr(importlib.import_module(module), cls):
            return ours
    raise UnsupportedModelError(
        f"unsupported attention {name}: zeroi2v has STDHA for "
        + ", ".join(c.timm_class for c in STDHA_CLASSES))


def stdha_from_timm(attn: nn.Module, num_frames: int, head_offsets: HeadOffsets = "auto",
                    backend: str = "auto") -> _STDHABase:
    """The STDHA version of a timm attention module (shares its weights)."""
    return stdha_class_for(attn).from_timm(attn, num_frames, head_offsets, backend)


