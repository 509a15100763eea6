"""Video models built from timm ViTs: config, model, merge, saved-model files."""
from .artefact import load_model, read_artefact, save_pretrained
from .config import ZeroI2VConfig
from .merge import merge_adapters
from .video_vit import ZeroI2VViT, create_video_model

__all__ = ["ZeroI2VViT", "ZeroI2VConfig", "create_video_model", "merge_adapters",
           "load_model", "read_artefact", "save_pretrained"]
