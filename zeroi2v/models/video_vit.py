"""The ZeroI2V video model: a timm ViT with STDHA, four linear adapters per block, a temporal
embedding and a video head (SPEC §3, §4)."""
from __future__ import annotations

import os
from functools import partial
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.adapter import LinearAdapter
from ..nn.attention import STDHAttention
from ..offsets import HeadOffsets, clamp_offsets

ADAPTER_NAMES = ("t_adapter", "s_adapter", "mlp_adapter", "mlp_adapter_out")


class ZeroI2VBlock(nn.Module):
    """A timm ``Block`` with STDHA and four adapters::

        x = x + ls1(S(attn(T(norm1(x)))))
        x = x + ls2(MLP_out(mlp(MLP(norm2(x)))))

    Submodule names are the timm Block's plus the four adapters; after
    :func:`zeroi2v.merge_adapters` the adapters are ``None`` and the state dict is a timm Block's.
    """

    def __init__(self, block: nn.Module, num_frames: int, head_offsets: HeadOffsets,
                 adapter_ratio: float, adapter_scale: float, adapter_dropout: float):
        super().__init__()
        _check_block(block)
        self.norm1 = block.norm1
        self.attn = STDHAttention.from_timm(block.attn, num_frames, head_offsets)
        self.ls1, self.drop_path1 = block.ls1, block.drop_path1
        self.norm2, self.mlp = block.norm2, block.mlp
        self.ls2, self.drop_path2 = block.ls2, block.drop_path2
        dim = block.norm1.weight.shape[0] if getattr(block.norm1, "weight", None) is not None \
            else block.attn.qkv.in_features
        p = block.attn.qkv.weight
        kw = dict(ratio=adapter_ratio, scale=adapter_scale, dropout=adapter_dropout,
                  device=p.device, dtype=p.dtype)
        self.t_adapter = LinearAdapter(dim, **kw)
        self.s_adapter = LinearAdapter(block.attn.proj.out_features, **kw)
        self.mlp_adapter = LinearAdapter(dim, **kw)
        self.mlp_adapter_out = LinearAdapter(block.mlp.fc2.out_features, **kw)

    #: Fused "adapter + frozen linear" ops (:mod:`zeroi2v.kernels.adapter`). ``None``: automatic
    #: (fused when training on CUDA in float16/bfloat16, autocast included); ``True``: fused wherever
    #: an (adapter, linear) pair allows it (also on CPU through the Triton interpreter); ``False``:
    #: never. Unset (``None``), the environment variable ``ZEROI2V_FUSED_ADAPTERS`` (``auto``/``1``/
    #: ``0``) decides. Either way the parameters and the state dict are the same.
    fused_adapters: Optional[bool] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_fused(x):
            return self._forward_fused(x)
        a = _maybe(self.s_adapter, self.attn(_maybe(self.t_adapter, self.norm1(x))))
        x = x + self.drop_path1(self.ls1(a))
        m = _maybe(self.mlp_adapter_out, self.mlp(_maybe(self.mlp_adapter, self.norm2(x))))
        return x + self.drop_path2(self.ls2(m))

    def _use_fused(self, x: torch.Tensor) -> bool:
        mode = self.fused_adapters if self.fused_adapters is not None else _fused_env()
        if mode is False or self.merged or getattr(self.attn, "gate", None) is not None:
            return False
        if mode is None:  # automatic
            dev = x.device.type
            dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            if not (self.training and x.is_cuda and dt in (torch.float16, torch.bfloat16)):
                return False
        return _fused_ops() is not None

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Same computation as the unfused path with each (adapter, frozen linear) pair run as one
        fused op; a pair that cannot be fused (trainable linear, dropout between the linear and its
        adapter, ...) runs unfused. The MLP is timm's ``Mlp`` (checked at construction), spelled out
        so its fc1/fc2 can be paired with the adapters."""
        fa = _fused_ops()
        attn, mlp = self.attn, self.mlp
        h = self.norm1(x)
        t_fused = fa.can_fuse(h, attn.qkv, self.t_adapter)
        s_fused = fa.can_fuse(h, attn.proj, self.s_adapter) and _no_dropout(attn.proj_drop)
        a = attn(
            h if t_fused else _maybe(self.t_adapter, h),
            qkv_fn=partial(fa.adapter_then_linear, self.t_adapter, attn.qkv) if t_fused else None,
            proj_fn=partial(fa.linear_then_adapter, attn.proj, self.s_adapter) if s_fused else None,
        )
        if not s_fused:
            a = _maybe(self.s_adapter, a)
        x = x + self.drop_path1(self.ls1(a))

        h = self.norm2(x)
        if fa.can_fuse(h, mlp.fc1, self.mlp_adapter):
            m = fa.adapter_then_linear(self.mlp_adapter, mlp.fc1, h)
        else:
            m = mlp.fc1(_maybe(self.mlp_adapter, h))
        m = mlp.norm(mlp.drop1(mlp.act(m)))
        if fa.can_fuse(m, mlp.fc2, self.mlp_adapter_out) and _no_dropout(mlp.drop2):
            m = fa.linear_then_adapter(mlp.fc2, self.mlp_adapter_out, m)
        else:
            m = _maybe(self.mlp_adapter_out, mlp.drop2(mlp.fc2(m)))
        return x + self.drop_path2(self.ls2(m))

    @property
    def merged(self) -> bool:
        return all(getattr(self, n) is None for n in ADAPTER_NAMES)


def _maybe(adapter: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    return x if adapter is None else adapter(x)


_FUSED_ENV = {"": None, "auto": None, "1": True, "on": True, "true": True, "always": True,
              "0": False, "off": False, "false": False, "never": False}


def _fused_env() -> Optional[bool]:
    v = os.environ.get("ZEROI2V_FUSED_ADAPTERS", "auto").strip().lower()
    if v not in _FUSED_ENV:
        raise ValueError(f"ZEROI2V_FUSED_ADAPTERS={v!r}: expected auto, 1 or 0")
    return _FUSED_ENV[v]


_FUSED_OPS: list = []


def _fused_ops():
    """The fused adapter ops module, or None when Triton is unavailable (imported once)."""
    if not _FUSED_OPS:
        try:
            from ..kernels import adapter as fa
        except ImportError:
            fa = None
        _FUSED_OPS.append(fa)
    return _FUSED_OPS[0]


def _no_dropout(m: nn.Module) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and (m.p == 0 or not m.training))


def _check_block(block: nn.Module) -> None:
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    if type(block) is not Block:
        raise TypeError(
            f"ZeroI2V needs timm ViTs built from the standard vision_transformer.Block; got "
            f"{type(block).__module__}.{type(block).__name__}"
        )
    if type(block.attn) is not Attention:
        raise TypeError(f"unsupported attention {type(block.attn).__name__}: need timm.layers.Attention")
    if type(block.mlp) is not Mlp or not isinstance(block.mlp.fc1, nn.Linear):
        raise TypeError(f"unsupported MLP {type(block.mlp).__name__}: need timm.layers.Mlp with nn.Linear")
    if getattr(block.attn, "gate", None) is not None:
        raise TypeError("gated attention is not supported by ZeroI2V")


class ZeroI2VViT(nn.Module):
    """Video classifier over a timm ``VisionTransformer`` (``self.backbone``).

    Input ``(B, C, T, H, W)``; frames go through the ViT as ``B*T`` images. Trainable: adapters,
    ``temporal_embedding``, the final norm and ``head`` (SPEC §3); everything else is frozen.

    The frame count is fixed at construction (it sizes the temporal embedding). A clip of another
    length is an error; :meth:`set_num_frames` re-targets the model instead (see its doc).
    """

    def __init__(self, backbone: nn.Module, num_frames: int, num_classes: int,
                 head_offsets: HeadOffsets = "vit_b", adapter_ratio: float = 0.25,
                 adapter_scale: float = 0.5, adapter_dropout: float = 0.1,
                 head_dropout: float = 0.5):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(backbone, VisionTransformer):
            raise TypeError(
                f"ZeroI2V supports timm VisionTransformer models, got {type(backbone).__name__}"
            )
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.num_frames = int(num_frames)
        self.embed_dim = backbone.embed_dim
        self.backbone.blocks = nn.Sequential(*[
            ZeroI2VBlock(b, num_frames, head_offsets, adapter_ratio, adapter_scale, adapter_dropout)
            for b in backbone.blocks
        ])
        p = next(backbone.parameters())
        self.temporal_embedding = nn.Parameter(
            torch.zeros(1, num_frames, self.embed_dim, device=p.device, dtype=p.dtype))
        self.head_drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(backbone.num_features, num_classes, device=p.device, dtype=p.dtype)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.freeze()

    # ------------------------------------------------------------------ parameters
    def freeze(self) -> None:
        """Freeze the image backbone; leave adapters, temporal embedding, final norm, head trainable."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        trainable = [self.temporal_embedding, *self.head.parameters(),
                     *self.backbone.norm.parameters(), *self.backbone.fc_norm.parameters()]
        for blk in self.backbone.blocks:
            for n in ADAPTER_NAMES:
                a = getattr(blk, n)
                if a is not None:
                    trainable.extend(a.parameters())
        for p in trainable:
            p.requires_grad_(True)

    @property
    def head_offsets(self) -> tuple[int, ...]:
        return self.backbone.blocks[0].attn.head_offsets

    @property
    def merged(self) -> bool:
        return all(b.merged for b in self.backbone.blocks)

    def set_num_frames(self, num_frames: int) -> None:
        """Re-target the model to clips of ``num_frames`` frames.

        The temporal embedding is resampled linearly over time (frames of a shorter clip span the
        same interval), and head offsets are clamped to ``|d| <= num_frames - 1`` keeping their
        sign, so every temporal head still looks at a neighbouring frame rather than falling back
        to its own (as the boundary rule alone would do for ``|d| >= T``).
        """
        num_frames = int(num_frames)
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if num_frames == self.num_frames:
            return
        with torch.no_grad():
            te = self.temporal_embedding.transpose(1, 2)  # (1, C, T)
            te = F.interpolate(te.float(), size=num_frames, mode="linear", align_corners=True) \
                if self.num_frames > 1 else te.float().expand(-1, -1, num_frames)
            self.temporal_embedding = nn.Parameter(
                te.transpose(1, 2).contiguous().to(self.temporal_embedding.dtype),
                requires_grad=self.temporal_embedding.requires_grad)
        for blk in self.backbone.blocks:
            blk.attn.set_temporal(num_frames, clamp_offsets(blk.attn.head_offsets, num_frames))
        self.num_frames = num_frames

    # ------------------------------------------------------------------ forward
    def _check_video(self, x: torch.Tensor) -> tuple[int, int]:
        if x.dim() != 5:
            raise ValueError(f"expected a video batch (B, C, T, H, W), got shape {tuple(x.shape)}")
        b, c, t = x.shape[:3]
        if t != self.num_frames:
            raise ValueError(
                f"wrong frame count: the video has {t} frames but the model was built for "
                f"{self.num_frames}; sample {self.num_frames} frames or call "
                f"model.set_num_frames({t})"
            )
        in_chans = self.backbone.patch_embed.proj.in_channels
        if c != in_chans:
            raise ValueError(f"expected {in_chans} channels in dim 1 of (B, C, T, H, W), got {c}")
        return b, t

    def forward_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Token features after the final norm: ``(B*T, N, C)``."""
        b, t = self._check_video(x)
        vit = self.backbone
        x = x.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W), frames of a video adjacent
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = (x.unflatten(0, (b, t)) + self.temporal_embedding.unsqueeze(2)).flatten(0, 1)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        if vit.grad_checkpointing and torch.is_grad_enabled():
            from timm.models._manipulate import checkpoint_seq
            x = checkpoint_seq(vit.blocks, x)
        else:
            x = vit.blocks(x)
        return vit.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame pooled features (the CLS token for CLIP/ViT): ``(B, T, C)``."""
        b = x.shape[0]
        feats = self.backbone.forward_head(self.forward_frames(x), pre_logits=True)
        return feats.unflatten(0, (b, self.num_frames))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x).mean(dim=1)))


def create_video_model(
    model: Union[str, nn.Module],
    num_frames: int,
    num_classes: int,
    head_offsets: HeadOffsets = "vit_b",
    adapter_ratio: float = 0.25,
    adapter_scale: float = 0.5,
    adapter_dropout: float = 0.1,
    pretrained_file: Optional[Union[str, os.PathLike]] = None,
    head_dropout: float = 0.5,
    **timm_kwargs,
) -> ZeroI2VViT:
    """Build a ZeroI2V video model from a timm ViT name or instance.

    ``pretrained_file`` is a local timm/safetensors/torch checkpoint loaded into the image model
    before conversion (no network access). ``timm_kwargs`` go to ``timm.create_model``.
    """
    import timm

    if isinstance(model, str):
        backbone = timm.create_model(model, pretrained=False, num_classes=0, **timm_kwargs)
    elif isinstance(model, nn.Module):
        backbone = model
    else:
        raise TypeError(f"model must be a timm model name or nn.Module, got {type(model).__name__}")
    if pretrained_file is not None:
        load_image_weights(backbone, pretrained_file)
    return ZeroI2VViT(backbone, num_frames, num_classes, head_offsets, adapter_ratio,
                      adapter_scale, adapter_dropout, head_dropout)


def load_image_weights(backbone: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Load an image-model checkpoint from a local file, ignoring any classifier head.

    OpenAI CLIP (TorchScript archive or state dict), open_clip and timm files are accepted; see
    :func:`zeroi2v.interop.load_clip_weights` (a mismatching key is a ``ValueError`` naming it).
    """
    from ..interop.clip import load_clip_weights

    load_clip_weights(backbone, path)
