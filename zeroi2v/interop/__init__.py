"""Interop: CLIP/timm image weights from local files, official ZeroI2V checkpoints, export.

    load_clip_weights(model_or_name, path)     OpenAI CLIP (TorchScript or state dict), open_clip,
                                               timm files -> timm ViT (timm's own key conversion)
    load_official_checkpoint(path, ...)        official mmaction2 checkpoint -> ZeroI2VViT
    export_merged(model, out) / load_merged(p) merged model <-> safetensors + JSON config
    export_program(model, x)                   torch.export.ExportedProgram of the merged model
    export_onnx(model, x, path)                ONNX file of the merged model

See docs/interop.md.
"""
from .checkpoint import read_checkpoint, read_state_dict
from .clip import load_clip_weights, load_image_state_dict
from .export import ExportedFiles, export_merged, export_onnx, export_program, load_merged
from .official import load_official_checkpoint, official_config

__all__ = [
    "load_clip_weights", "load_image_state_dict", "load_official_checkpoint", "official_config",
    "export_merged", "load_merged", "export_program", "export_onnx", "ExportedFiles",
    "read_checkpoint", "read_state_dict",
]
