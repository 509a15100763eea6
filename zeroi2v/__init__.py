"""zeroi2v: adapt a pretrained image ViT to video at zero extra inference cost (ZeroI2V, ECCV 2024).

Public API:
    stdha_attention        functional spatial-temporal dual-headed attention (backend dispatch)
    STDHAttention          drop-in timm ``Attention`` replacement (``zeroi2v.nn``)
    LinearAdapter          mergeable bottleneck adapter (``zeroi2v.nn``)
    create_video_model     timm ViT name/instance -> ZeroI2V video classifier
    ZeroI2VConfig          the model's description (``model.config``, ``ZeroI2VViT.from_config``)
    load_model             a saved model folder (``model.save_pretrained(dir)``) -> ZeroI2VViT
    merge_adapters         fold adapters into the frozen linears -> plain ViT + STDHA
    PRESETS                official head-offset layouts
"""
from ._version import __version__
from .models.artefact import load_model
from .models.config import ZeroI2VConfig
from .models.merge import merge_adapters
from .models.video_vit import ZeroI2VViT, create_video_model
from .offsets import PRESETS, resolve_offsets, source_frames
from .ops.stdha import available_backends, register_backend, stdha_attention, stdha_reference

__all__ = [
    "PRESETS", "resolve_offsets", "source_frames", "stdha_attention", "stdha_reference",
    "register_backend", "available_backends", "ZeroI2VViT", "ZeroI2VConfig", "create_video_model",
    "load_model", "merge_adapters", "__version__",
]
