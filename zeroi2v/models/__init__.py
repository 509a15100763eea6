"""Video models built from timm ViTs."""
from .merge import merge_adapters
from .video_vit import ZeroI2VBlock, ZeroI2VViT, create_video_model

__all__ = ["ZeroI2VBlock", "ZeroI2VViT", "create_video_model", "merge_adapters"]
