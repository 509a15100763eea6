"""The ZeroI2V video model: a timm ViT with STDHA, four linear adapters per block, a temporal
embedding and a video head (SPEC §3, §4)."""
from __future__ import annotations

import contextlib
import os
from functools import partial
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.adapter import LinearAdapter
from ..nn.attention import STDHAttention
from ..offsets import HeadOffsets, check_offsets, clamp_offsets, resolve_offsets
from . import timm_spec
from ..errors import UnsupportedModelError
from .config import ADAPTER_NAMES, ZeroI2VConfig


class ZeroI2VBlock(nn.Module):
    """A timm ``Block`` with STDHA and four adapters::

        x = x + ls1(S(attn(T(norm1(x)))))
        x = x + ls2(MLP_out(mlp(MLP(norm2(x)))))

    Submodule names are the timm Block's plus the four adapters; after
    :func:`zeroi2v.merge_adapters` the adapters are ``None`` and the state dict is a timm Block's.
    """

    def __init__(self, block: nn.Module, num_frames: int, head_offsets: HeadOffsets,
                 adapter_ratio: float, adapter_scale: float, adapter_dropout: float,
                 adapters: Sequence[str] = ADAPTER_NAMES):
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
        dims = {"t_adapter": dim, "s_adapter": block.attn.proj.out_features,
                "mlp_adapter": dim, "mlp_adapter_out": block.mlp.fc2.out_features}
        for n in ADAPTER_NAMES:
            setattr(self, n, LinearAdapter(dims[n], **kw) if n in adapters else None)

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


def fused_adapters_active(model: nn.Module, device, dtype: torch.dtype, training: bool) -> bool:
    """Whether the blocks of ``model`` run the fused adapter ops for inputs of this device and
    dtype (``dtype``: the autocast dtype when autocasting)."""
    blocks = [b for b in model.modules() if isinstance(b, ZeroI2VBlock)]
    if not blocks or blocks[0].merged:
        return False
    mode = blocks[0].fused_adapters if blocks[0].fused_adapters is not None else _fused_env()
    if mode is False:
        return False
    if mode is None and not (training and torch.device(device).type == "cuda"
                             and dtype in (torch.float16, torch.bfloat16)):
        return False
    return _fused_ops() is not None


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
        raise UnsupportedModelError(
            f"ZeroI2V needs timm ViTs built from the standard vision_transformer.Block; got "
            f"{type(block).__module__}.{type(block).__name__}"
        )
    if type(block.attn) is not Attention:
        raise UnsupportedModelError(f"unsupported attention {type(block.attn).__name__}: need timm.layers.Attention")
    if type(block.mlp) is not Mlp or not isinstance(block.mlp.fc1, nn.Linear):
        raise UnsupportedModelError(f"unsupported MLP {type(block.mlp).__name__}: need timm.layers.Mlp with nn.Linear")
    if getattr(block.attn, "gate", None) is not None:
        raise UnsupportedModelError("gated attention is not supported by ZeroI2V")


class ZeroI2VViT(nn.Module):
    """Video classifier over a timm ``VisionTransformer`` (``self.backbone``).

    Input ``(B, C, T, H, W)``; frames go through the ViT as ``B*T`` images. Trainable: adapters,
    ``temporal_embedding``, the final norm and ``head`` (SPEC §3); everything else is frozen.

    Build one with :func:`create_video_model` (a timm name or instance) or
    :meth:`from_config`; save it with :meth:`save_pretrained` and read it back with
    :func:`zeroi2v.load_model`. :attr:`config` describes the model as it is now.

    The frame count is fixed at construction (it sizes the temporal embedding). A clip of another
    length is an error; :meth:`set_num_frames` re-targets the model instead (see its doc).
    """

    def __init__(self, backbone: nn.Module, config: ZeroI2VConfig):
        """Wrap ``backbone`` (a timm ``VisionTransformer`` without classifier, used as is) as
        ``config`` says. ``config.model_name``/``timm_kwargs`` must describe ``backbone``; use
        :meth:`from_config` or :func:`create_video_model`, which guarantee that."""
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(backbone, VisionTransformer):
            raise UnsupportedModelError(
                f"ZeroI2V supports timm VisionTransformer models, got {type(backbone).__name__}"
            )
        if not isinstance(config, ZeroI2VConfig):
            raise TypeError(f"config must be a ZeroI2VConfig, got {type(config).__name__}")
        _check_backbone(backbone, config)
        if backbone.num_classes:
            backbone.reset_classifier(0)
        self.backbone = backbone
        self.num_frames = config.num_frames
        self.embed_dim = backbone.embed_dim
        self.backbone.blocks = nn.Sequential(*[
            ZeroI2VBlock(b, config.num_frames, config.head_offsets, config.adapter_ratio,
                         config.adapter_scale, config.adapter_dropout, config.adapters_of(i))
            for i, b in enumerate(backbone.blocks)
        ])
        p = next(backbone.parameters())
        self.temporal_embedding = nn.Parameter(
            torch.zeros(1, config.num_frames, self.embed_dim, device=p.device, dtype=p.dtype))
        self.head_drop = nn.Dropout(config.head_dropout)
        self.head = nn.Linear(backbone.num_features, config.num_classes, device=p.device,
                              dtype=p.dtype)
        if p.device.type != "meta":
            nn.init.trunc_normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)
        # what the live modules cannot tell: the timm recipe and the adapter settings
        self._spec = config.replace(head_offsets=self.backbone.blocks[0].attn.head_offsets,
                                    adapters=None)
        self.freeze()

    @classmethod
    def from_config(cls, config: ZeroI2VConfig, *, device=None, dtype=None,
                    empty: bool = False) -> "ZeroI2VViT":
        """A model with freshly initialised weights, built exactly as ``config`` says (the
        backbone through ``timm.create_model``). ``empty=True`` leaves the parameters on the meta
        device, to be loaded with ``load_state_dict(..., assign=True)`` (what
        :func:`zeroi2v.load_model` does; buffers are real)."""
        if config.timm_kwargs is None:
            raise ValueError(
                f"the config does not say how to build its {config.model_name!r} backbone "
                "(timm_kwargs unknown): the model was made from an instance zeroi2v could not "
                "describe; build it with create_video_model(name, ..., **timm_kwargs)")
        ctx = timm_spec.parameters_on_meta() if empty else contextlib.nullcontext()
        with ctx:
            backbone = timm_spec.create(config.model_name, dict(config.timm_kwargs), device=device)
            model = cls(backbone, config)
        if dtype is not None:
            model.to(dtype)
        return model

    # ------------------------------------------------------------------ description
    @property
    def config(self) -> ZeroI2VConfig:
        """The model's :class:`ZeroI2VConfig` as it is now (frame count, head offsets and
        adapters are read from the modules)."""
        offsets = {blk.attn.head_offsets for blk in self.backbone.blocks}
        if len(offsets) != 1:
            raise ValueError("the blocks use different head offsets; a ZeroI2VConfig holds one "
                             f"layout for all blocks, got {sorted(offsets)}")
        adapters = tuple(tuple(n for n in ADAPTER_NAMES if getattr(blk, n) is not None)
                         for blk in self.backbone.blocks)
        if all(len(a) == len(ADAPTER_NAMES) for a in adapters):
            adapters = None
        return self._spec.replace(num_frames=self.num_frames, num_classes=self.head.out_features,
                                  head_offsets=offsets.pop(), adapters=adapters,
                                  head_dropout=self.head_drop.p)

    @property
    def class_names(self) -> Optional[tuple[str, ...]]:
        return self._spec.class_names

    @class_names.setter
    def class_names(self, names: Optional[Sequence[str]]) -> None:
        self._spec = self._spec.replace(class_names=None if names is None else tuple(names),
                                        num_classes=self.head.out_features)

    def save_pretrained(self, path, **kwargs):
        """Write ``config.json`` + ``model.safetensors`` into the folder ``path``; see
        :func:`zeroi2v.models.artefact.save_pretrained`."""
        from .artefact import save_pretrained

        return save_pretrained(self, path, **kwargs)

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
    head_offsets: HeadOffsets = ZeroI2VConfig.head_offsets,
    adapter_ratio: float = ZeroI2VConfig.adapter_ratio,
    adapter_scale: float = ZeroI2VConfig.adapter_scale,
    adapter_dropout: float = ZeroI2VConfig.adapter_dropout,
    pretrained_file: Optional[Union[str, os.PathLike]] = None,
    head_dropout: float = ZeroI2VConfig.head_dropout,
    class_names: Optional[Sequence[str]] = None,
    **timm_kwargs,
) -> ZeroI2VViT:
    """Build a ZeroI2V video model from a timm ViT name or instance.

    With a name, the backbone is ``timm.create_model(model, pretrained=False, num_classes=0,
    **timm_kwargs)`` and ``model.config`` records exactly that. With an instance, the instance is
    checked first and then *copied* (the caller's model is never modified); its timm name and
    construction kwargs are recovered and verified (:func:`zeroi2v.models.timm_spec.describe`),
    so the result can be saved and rebuilt; where they cannot be recovered the model works but
    :meth:`ZeroI2VViT.save_pretrained` refuses it. ``pretrained_file`` is a local
    timm/safetensors/CLIP checkpoint loaded into the image model before conversion (no network).
    """
    import copy

    if isinstance(model, str):
        # kwargs that are classes or functions build a model but cannot be saved as JSON
        kwargs = dict(timm_kwargs) if _jsonable(timm_kwargs) else None
        _check_timm_name(model, num_frames, num_classes, head_offsets, kwargs)
        backbone = timm_spec.create(model, timm_kwargs)
        name = model
    elif isinstance(model, nn.Module):
        if timm_kwargs:
            raise TypeError(f"timm keyword arguments {sorted(timm_kwargs)} only apply to a model "
                            "name; an instance is used as built")
        _check_instance(model)
        backbone = copy.deepcopy(model)
        if getattr(backbone, "num_classes", 0):
            backbone.reset_classifier(0)
        name, kwargs = timm_spec.describe(backbone)
    else:
        raise TypeError(f"model must be a timm model name or nn.Module, got {type(model).__name__}")
    config = ZeroI2VConfig(
        model_name=name or type(model).__name__, timm_kwargs=kwargs, num_frames=num_frames,
        num_classes=num_classes, head_offsets=head_offsets, adapter_ratio=adapter_ratio,
        adapter_scale=adapter_scale, adapter_dropout=adapter_dropout, head_dropout=head_dropout,
        class_names=class_names)
    if pretrained_file is not None:
        load_image_weights(backbone, pretrained_file)
    return ZeroI2VViT(backbone, config)


def _jsonable(kwargs: dict) -> bool:
    import json

    try:
        json.dumps(kwargs)
        return True
    except TypeError:
        return False


def _check_timm_name(name: str, num_frames, num_classes, head_offsets, timm_kwargs) -> None:
    """Everything that can be checked before building a (possibly large) backbone."""
    ZeroI2VConfig(model_name=name, timm_kwargs=timm_kwargs, num_frames=num_frames,
                  num_classes=num_classes, head_offsets=head_offsets)


def _check_instance(model: nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(f"ZeroI2V supports timm VisionTransformer models, got {type(model).__name__}")
    for b in model.blocks:
        _check_block(b)


def _check_backbone(backbone: nn.Module, config: ZeroI2VConfig) -> None:
    """Refuse before any module is replaced: every block supported, the adapter list and the
    head offsets fit the backbone."""
    for b in backbone.blocks:
        _check_block(b)
    if config.adapters is not None and len(config.adapters) != len(backbone.blocks):
        raise ValueError(f"model config: adapters lists {len(config.adapters)} blocks, the "
                         f"backbone has {len(backbone.blocks)}")
    offsets = resolve_offsets(config.head_offsets, backbone.blocks[0].attn.num_heads,
                              config.num_frames)
    check_offsets(offsets, config.num_frames)


def load_image_weights(backbone: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Load an image-model checkpoint from a local file, ignoring any classifier head.

    OpenAI CLIP (TorchScript archive or state dict), open_clip and timm files are accepted; see
    :func:`zeroi2v.interop.load_clip_weights` (a mismatching key is a ``ValueError`` naming it).
    """
    from ..interop.clip import load_clip_weights

    load_clip_weights(backbone, path)
