"""The ZeroI2V video model: a timm ViT with STDHA, linear adapters next to its frozen linears, a
temporal embedding and a video head (docs/method.md §3, §4).

The timm model's own blocks and their forward code stay; what changes inside them is described
in :mod:`zeroi2v.models.families` (STDHA attention modules, adapted linears).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import settings
from ..errors import UnsupportedModelError
from ..limits import check_bytes
from ..nn.adapter import AdaptedLinear, LinearAdapter
from ..nn.attention import STDHA_CLASSES, stdha_from_timm
from ..offsets import HeadOffsets, check_offsets, clamp_offsets, resolve_offsets
from ..ops.adapter import fused_not_supported_reasons
from ..ops.stdha import get_backend
from . import timm_spec
from .config import ADAPTER_NAMES, ZeroI2VConfig
from .families import adapter_dim, adapter_sites, family_of, input_channels
from .timm_args import check_timm_kwargs


class ZeroI2VViT(nn.Module):
    """Video classifier over a timm ViT (``self.backbone``: a ``VisionTransformer``, ``Eva`` or
    ``Beit`` whose attention modules do STDHA and whose frozen linears carry the adapters).

    Input ``(B, C, T, H, W)``; frames go through the ViT as ``B*T`` images. Trainable: adapters,
    ``temporal_embedding``, the final norm and ``head`` (docs/method.md §3); everything else is frozen.

    Build one with :func:`create_video_model` (a timm name or instance) or
    :meth:`from_config`; save it with :meth:`save_pretrained` and read it back with
    :func:`zeroi2v.load_model`. :attr:`config` describes the model as it is now.

    The frame count is fixed at construction (it sizes the temporal embedding). A clip of another
    length is an error; :meth:`set_num_frames` re-targets the model instead (see its doc).
    """

    def __init__(self, backbone: nn.Module, config: ZeroI2VConfig):
        """Wrap ``backbone`` (a timm model without classifier, modified in place) as ``config``
        says. ``config.model_name``/``timm_kwargs`` must describe ``backbone``; use
        :meth:`from_config` or :func:`create_video_model`, which guarantee that."""
        super().__init__()
        if not isinstance(config, ZeroI2VConfig):
            raise TypeError(f"config must be a ZeroI2VConfig, got {type(config).__name__}")
        family = family_of(backbone)
        family.check(backbone)
        offsets = _offsets_that_fit(backbone, config)
        if getattr(backbone, "num_classes", 0):
            backbone.reset_classifier(0)
        self._family = family
        self.backbone = backbone
        self.num_frames = config.num_frames
        self.embed_dim = backbone.embed_dim
        p = next(backbone.parameters())
        kw = dict(ratio=config.adapter_ratio, scale=config.adapter_scale,
                  dropout=config.adapter_dropout, device=p.device, dtype=p.dtype)
        for i, blk in enumerate(backbone.blocks):
            blk.attn = stdha_from_timm(blk.attn, config.num_frames, offsets)
            for slot, (sites, position) in adapter_sites(blk).items():
                if slot not in config.adapters_of(i):
                    continue
                adapter = LinearAdapter(adapter_dim(sites, position), **kw)
                for k, (parent, attr) in enumerate(sites):
                    setattr(parent, attr, AdaptedLinear(getattr(parent, attr), adapter, position,
                                                        shared=k > 0, sites=len(sites)))
        self.temporal_embedding = nn.Parameter(
            torch.zeros(1, config.num_frames, self.embed_dim, device=p.device, dtype=p.dtype))
        self.head_drop = nn.Dropout(config.head_dropout)
        self.head = nn.Linear(backbone.num_features, config.num_classes, device=p.device,
                              dtype=p.dtype)
        if p.device.type != "meta":
            nn.init.trunc_normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)
        # what the live modules cannot tell: the timm recipe, the adapter settings and slots
        self._spec = config.replace(head_offsets=offsets, merged=False)
        self._built_offsets = offsets  # what set_num_frames clamps, so a round trip restores it
        self.freeze()
        if config.merged:  # the structure of a merged model: fold the fresh adapters (identity)
            # cycle: models.merge imports ZeroI2VViT from this module
            from .merge import merge_adapters

            merge_adapters(self, inplace=True)
            self._spec = config.replace(head_offsets=offsets)

    @classmethod
    def from_config(cls, config: ZeroI2VConfig, *, device=None, dtype=None,
                    empty: bool = False) -> ZeroI2VViT:
        """A model with freshly initialised weights, built exactly as ``config`` says (the
        backbone through ``timm.create_model``). ``empty=True`` leaves the parameters on the meta
        device, to be loaded with ``load_state_dict(..., assign=True)`` (what
        :func:`zeroi2v.load_model` does; buffers are real)."""
        if config.timm_kwargs is None:
            raise ValueError(
                f"the config does not say how to build its {config.model_name!r} backbone "
                "(timm_kwargs unknown): the model was made from an instance zeroi2v could not "
                "describe; build it with create_video_model(name, ..., **timm_kwargs)")
        if device is None or torch.device(device).type != "meta":
            check_model_size(config)
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
        classes are read from the modules)."""
        offsets = {blk.attn.head_offsets for blk in self.backbone.blocks}
        if len(offsets) != 1:
            raise ValueError("the blocks use different head offsets; a ZeroI2VConfig holds one "
                             f"layout for all blocks, got {sorted(offsets)}")
        return self._spec.replace(num_frames=self.num_frames, num_classes=self.head.out_features,
                                  head_offsets=offsets.pop(), head_dropout=self.head_drop.p)

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
        # cycle: models.artefact builds on this module (imports ZeroI2VViT)
        from .artefact import save_pretrained

        return save_pretrained(self, path, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Save the model with a generated model card into the Hub repository ``repo_id``
        (``ORG/NAME``); see :func:`zeroi2v.models.hub_push.push_to_hub`."""
        from .hub_push import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def load_pretrained(self, source: Union[bool, str, os.PathLike] = True) -> dict:
        """Load image weights into the backbone (adapters, temporal embedding and head are left
        as they are) and record where they came from in :attr:`config` (``pretrained_source``).

        ``source=True``: timm's weights for the tagged model name (``config.model_name``, e.g.
        ``vit_base_patch16_clip_224.openai``) through the Hugging Face cache
        (:func:`zeroi2v.models.hub.timm_weights_file`: safetensors first, a pickle only through
        the restricted reader; ``HF_HUB_OFFLINE=1`` reads the cache alone).
        ``"hf-hub:ORG/NAME[@REV]:FILE"``: that file of a Hub repository, likewise. A path: a local
        OpenAI CLIP, open_clip or timm file. Returns the recorded source."""
        from .hub import resolve_pretrained

        if self.merged:  # checked before anything is fetched
            raise ValueError("the model is merged (its linears hold folded adapters): load image "
                             "weights before merging")
        return self.load_pretrained_file(*resolve_pretrained(source, self._spec.model_name))

    def load_pretrained_file(self, path, record: dict) -> dict:
        """What :meth:`load_pretrained` does once the file is found: load the image weights in
        the local file ``path`` into the backbone and record ``record`` as their source."""
        if self.merged:
            raise ValueError("the model is merged (its linears hold folded adapters): load image "
                             "weights before merging")
        load_image_weights(self.backbone, path)
        self._spec = self._spec.replace(pretrained_source=record)
        return record

    # ------------------------------------------------------------------ parts
    def adapted_linears(self) -> list[AdaptedLinear]:
        return [m for m in self.backbone.modules() if isinstance(m, AdaptedLinear)]

    def adapters(self, block: int) -> dict[str, LinearAdapter]:
        """The adapters of block ``block``, by slot (``t_adapter``, ``s_adapter``, ...)."""
        out = {}
        for slot, (sites, _) in adapter_sites(self.backbone.blocks[block]).items():
            lin = getattr(*sites[0]) if sites else None
            if isinstance(lin, AdaptedLinear):
                out[slot] = lin.get_adapter()
        return out

    def attentions(self) -> list[nn.Module]:
        return [m for m in self.backbone.modules() if isinstance(m, STDHA_CLASSES)]

    def set_attn_backend(self, backend: str) -> None:
        """The STDHA backend of every attention (``"auto"``, ``"torch"``, ``"triton"``, ...)."""
        if backend != "auto":
            get_backend(backend)  # an unknown name fails here, not at the first forward
        for a in self.attentions():
            a.backend = backend

    def set_fused_adapters(self, mode: Optional[bool]) -> None:
        """Fused adapter ops for every adapted linear: ``None`` automatic (training on CUDA in
        fp16/bf16), ``True`` wherever they can run, ``False`` never."""
        if mode not in (None, True, False):
            raise ValueError(f"fused adapters: None, True or False, got {mode!r}")
        for m in self.adapted_linears():
            m.fused = mode

    def freeze(self) -> None:
        """Freeze the image backbone; leave adapters, temporal embedding, final norm, head trainable."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        trainable = [self.temporal_embedding, *self.head.parameters()]
        for name in ("norm", "fc_norm"):
            mod = getattr(self.backbone, name, None)
            if isinstance(mod, nn.Module):
                trainable.extend(mod.parameters())
        for m in self.adapted_linears():
            if not m.shared:
                trainable.extend(m.adapter.parameters())
        for p in trainable:
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> ZeroI2VViT:
        """As ``nn.Module.train``, except that batch norms with no trainable parameter (the frozen
        CNN stem of a hybrid) stay in eval mode: their running statistics are part of the frozen
        image model and must not drift while the adapters train."""
        super().train(mode)
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in m.parameters()):
                m.eval()
        return self

    @property
    def family(self) -> str:
        """``"vit"``, ``"eva"`` or ``"beit"`` (:mod:`zeroi2v.models.families`)."""
        return self._family.name

    @property
    def family_rules(self):
        """The :class:`~zeroi2v.models.families.Family` entry of the backbone."""
        return self._family

    def record_merge(self, timm_kwargs: Optional[dict] = None) -> None:
        """Say in :attr:`config` that the adapters are folded in (:func:`merge_adapters` calls
        this), with the timm keywords the folded biases need (``qkv_bias=True`` ...)."""
        kw = self._spec.timm_kwargs
        if timm_kwargs and kw is not None:
            kw = dict(kw, **timm_kwargs)
        self._spec = self._spec.replace(merged=True, timm_kwargs=kw)

    @property
    def head_offsets(self) -> tuple[int, ...]:
        return self.backbone.blocks[0].attn.head_offsets

    @property
    def merged(self) -> bool:
        return self._spec.merged

    def set_num_frames(self, num_frames: int) -> None:
        """Re-target the model to clips of ``num_frames`` frames.

        The temporal embedding is resampled linearly over time (frames of a shorter clip span the
        same interval), and head offsets are clamped to ``|d| <= num_frames - 1`` keeping their
        sign, so every temporal head still looks at a neighbouring frame rather than falling back
        to its own (as the boundary rule alone would do for ``|d| >= T``). The offsets are always
        derived from the ones the model was built with, so going back to the original length
        restores them; the temporal embedding is resampled from the current one (a round trip
        through fewer frames loses detail). The embedding becomes a new ``nn.Parameter``: build
        the optimiser after this call.
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
        for attn in self.attentions():
            attn.set_temporal(num_frames, clamp_offsets(self._built_offsets, num_frames))
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
        in_chans = input_channels(self.backbone)
        if c != in_chans:
            raise ValueError(f"expected {in_chans} channels in dim 1 of (B, C, T, H, W), got {c}")
        return b, t

    def forward_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Token features after the final norm: ``(B*T, N, C)``."""
        b, t = self._check_video(x)

        def add_temporal(tokens):  # frame t of every video gets temporal_embedding[t]
            return (tokens.unflatten(0, (b, t)) + self.temporal_embedding.unsqueeze(2)).flatten(0, 1)

        return self._family.forward_tokens(self.backbone, x.transpose(1, 2).flatten(0, 1),
                                           add_temporal)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame pooled features (the CLS token for CLIP/ViT): ``(B, T, C)``."""
        b = x.shape[0]
        feats = self.backbone.forward_head(self.forward_frames(x), pre_logits=True)
        return feats.unflatten(0, (b, self.num_frames))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x).mean(dim=1)))


def _offsets_that_fit(backbone: nn.Module, config: ZeroI2VConfig) -> tuple[int, ...]:
    """The config's head offsets as ints, checked with the adapter list before any module is
    replaced (both must fit the backbone)."""
    if config.adapters is not None and len(config.adapters) != len(backbone.blocks):
        raise ValueError(f"model config: adapters lists {len(config.adapters)} blocks, the "
                         f"backbone has {len(backbone.blocks)}")
    offsets = resolve_offsets(config.head_offsets, backbone.blocks[0].attn.num_heads,
                              config.num_frames)
    check_offsets(offsets, config.num_frames)
    return offsets


def fused_adapters_active(model: nn.Module, device, dtype: torch.dtype, training: bool) -> bool:
    """Whether the adapted linears of ``model`` run the fused ops for inputs of this device and
    dtype (``dtype``: the autocast dtype when autocasting), by the op's own rule
    (:func:`zeroi2v.ops.adapter.fused_not_supported_reasons`) on an empty probe input."""
    lin = next((m for m in model.modules() if isinstance(m, AdaptedLinear) and m.sites == 1),
               None)
    if lin is None:
        return False
    mode = lin.fused if lin.fused is not None else settings.fused_adapters()
    if mode is False:
        return False
    adapter = lin.get_adapter()
    was = adapter.training
    adapter.train(training)
    try:
        with torch.set_grad_enabled(training):
            probe = torch.empty(0, lin.in_features, device=device, dtype=dtype)
            return not fused_not_supported_reasons(probe, lin.weight, lin.bias, adapter,
                                                   automatic=mode is None)
    finally:
        adapter.train(was)


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
    fused_adapters: Optional[bool] = None,
    pretrained: bool = False,
    **timm_kwargs,
) -> ZeroI2VViT:
    """Build a ZeroI2V video model from a timm ViT name or instance.

    With a name, the backbone is ``timm.create_model(model, pretrained=False, num_classes=0,
    **timm_kwargs)`` and ``model.config`` records exactly that. With an instance, the instance is
    checked first and then *copied* (the caller's model is never modified); its timm name and
    construction kwargs are recovered and verified (:func:`zeroi2v.models.timm_spec.describe`),
    so the result can be saved and rebuilt; where they cannot be recovered the model works but
    :meth:`ZeroI2VViT.save_pretrained` refuses it. ``pretrained=True`` loads timm's weights for
    a tagged name (``"vit_base_patch16_clip_224.openai"``) from the Hugging Face cache,
    downloading them there once (safetensors first; no code runs; ``HF_HUB_OFFLINE=1`` uses the
    cache alone); ``pretrained_file`` is a local timm/safetensors/CLIP checkpoint instead. Either
    way ``model.config.pretrained_source`` records the file (repository, commit, SHA-256)
    (:meth:`ZeroI2VViT.load_pretrained`).
    ``head_offsets`` defaults to ``"auto"`` (:func:`zeroi2v.offsets.auto_offsets`).
    ``fused_adapters``: see :meth:`ZeroI2VViT.set_fused_adapters`.
    """
    import copy

    if not isinstance(pretrained, bool):
        raise ValueError(f"pretrained= is True or False (timm's weights for the tagged model name,"
                         f" from the Hub), got {pretrained!r}; a local file goes in "
                         "pretrained_file=")
    if pretrained and pretrained_file is not None:
        raise ValueError("pass pretrained=True (timm's weights from the Hub) or pretrained_file="
                         " (a local file), not both")
    if pretrained and not isinstance(model, str):
        raise ValueError("pretrained=True needs a timm model name with a tag (e.g. "
                         "'vit_base_patch16_clip_224.openai'): an instance keeps its own weights")
    found = None
    if pretrained or pretrained_file is not None:  # found (or fetched) before anything is built
        from .hub import resolve_pretrained

        found = resolve_pretrained(True if pretrained else pretrained_file, model)
    if isinstance(model, str):
        # kwargs that are classes or functions build a model but cannot be saved as JSON
        check_timm_kwargs(timm_kwargs, "create_video_model", allow_classes=True)
        kwargs = dict(timm_kwargs) if _jsonable(timm_kwargs) else None
        ZeroI2VConfig(model_name=model, timm_kwargs=kwargs, num_frames=num_frames,
                      num_classes=num_classes, head_offsets=head_offsets)  # fail before building
        if kwargs is not None:
            check_model_size(ZeroI2VConfig(model_name=model, timm_kwargs=kwargs,
                                           num_frames=num_frames, num_classes=num_classes,
                                           head_offsets=head_offsets, adapter_ratio=adapter_ratio))
        backbone = timm_spec.create(model, timm_kwargs)
        name = model
    elif isinstance(model, nn.Module):
        if timm_kwargs:
            raise TypeError(f"timm keyword arguments {sorted(timm_kwargs)} only apply to a model "
                            "name; an instance is used as built")
        family_of(model).check(model)  # refuse before copying anything
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
    video = ZeroI2VViT(backbone, config)
    if found is not None:
        video.load_pretrained_file(*found)
    if fused_adapters is not None:
        video.set_fused_adapters(fused_adapters)
    return video


def model_size(config: ZeroI2VConfig) -> tuple[int, int, int]:
    """``(parameters, trainable parameters, buffer bytes)`` of the (unmerged) model ``config``
    describes, from meta-device builds of at most two blocks: no memory, and fast for any depth
    (blocks are identical in size). Buffers count too: BEiT's relative position index grows
    with the square of the token count, whatever the parameters."""
    kwargs = dict(config.timm_kwargs or {})
    cfg = config.replace(merged=False, adapters=None)
    depth = kwargs.get("depth")

    def count(c: ZeroI2VConfig) -> tuple[int, int, int]:
        try:
            m = ZeroI2VViT.from_config(c, device="meta")
        except UnsupportedModelError:
            raise  # says itself which class zeroi2v does not take
        except (RuntimeError, OverflowError, TypeError, AssertionError) as e:
            raise ValueError(f"timm cannot build {c.model_name} with {dict(c.timm_kwargs or {})}"
                             f": {str(e).strip().splitlines()[0] if str(e).strip() else e}"
                             ) from None
        ps = list(m.parameters())
        return (sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad),
                sum(b.numel() * b.element_size() for b in m.buffers()))

    if not isinstance(depth, int) or depth <= 2:
        return count(cfg)
    one = count(cfg.replace(timm_kwargs=dict(kwargs, depth=1)))
    two = count(cfg.replace(timm_kwargs=dict(kwargs, depth=2)))
    return tuple(a + (depth - 1) * (b - a) for a, b in zip(one, two))


def parameter_count(config: ZeroI2VConfig) -> tuple[int, int]:
    """``(all, trainable)`` parameters of the model ``config`` describes (see
    :func:`model_size`)."""
    return model_size(config)[:2]


def check_model_size(config: ZeroI2VConfig, bytes_per_param: int = 4) -> int:
    """Refuse a config whose model (parameters and buffers) would not fit the memory limit
    (:mod:`zeroi2v.limits`), before anything is allocated; returns the parameter count."""
    n, _, buffers = model_size(config)
    kw = config.timm_kwargs or {}
    shape = ", ".join(f"{k} {kw[k]}" for k in ("depth", "embed_dim", "img_size", "patch_size")
                      if k in kw)
    extra = f" and {buffers / 1e6:,.0f} MB of buffers" if buffers > 1e8 else ""
    check_bytes(n * bytes_per_param + buffers,
                f"the model {config.model_name} ({n:,} parameters{extra}: "
                f"{shape + ', ' if shape else ''}{config.num_classes:,} classes, "
                f"{config.num_frames} frames)",
                fix="check the timm kwargs (depth, embed_dim, image and patch size), the class "
                    "count (the largest label in the annotations) and the frame count")
    return n


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def image_model_params(config: ZeroI2VConfig) -> int:
    """Parameter count of the plain timm image ViT (no classifier) the model is built from (as
    timm builds it from the config: for a merged model, with the biases the merge added)."""
    return count_params(timm_spec.create(config.model_name, dict(config.timm_kwargs or {}),
                                         device="meta"))


def _jsonable(kwargs: dict) -> bool:
    import json

    try:
        json.dumps(kwargs)
        return True
    except TypeError:
        return False


def load_image_weights(backbone: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Load an image-model checkpoint from a local file, ignoring any classifier head.

    OpenAI CLIP (TorchScript archive or state dict), open_clip and timm files are accepted; see
    :func:`zeroi2v.interop.load_clip_weights` (a mismatching key is a ``ValueError`` naming it).
    """
    from .image_weights import load_clip_weights  # (it imports families, not this module)

    load_clip_weights(backbone, path)


__all__ = ["ZeroI2VViT", "create_video_model", "load_image_weights", "fused_adapters_active",
           "count_params", "image_model_params", "parameter_count", "model_size",
           "ADAPTER_NAMES", "UnsupportedModelError"]
