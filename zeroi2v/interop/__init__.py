"""Interop: CLIP/timm image weights from local files, official ZeroI2V checkpoints, graph exports.

    load_clip_weights(model_or_name, path)     OpenAI CLIP (TorchScript or state dict), open_clip,
                                               timm files -> timm ViT (timm's own key conversion)
    load_official_checkpoint(path, ...)        official mmaction2 checkpoint -> ZeroI2VViT
                                               (= infer_official_config + official_filter_fn)
    export_program(model, x)                   torch.export.ExportedProgram of the merged model
    export_onnx(model, x, path)                ONNX file of the merged model (the onnx extra)
    onnx_files(path)                           that file and its external-data files, if any

The model file itself is ``model.save_pretrained(dir)`` / ``zeroi2v.load_model(dir)``. See
docs/interop.md.
"""
from ..models.image_weights import load_clip_weights, load_image_state_dict
from ..safe_io import read_checkpoint, read_state_dict
from .export import export_onnx, export_program, onnx_files
from .official import (
                       RELEASED_CONFIGS,
                       infer_official_config,
                       load_official_checkpoint,
                       official_config,
                       official_filter_fn,
)

__all__ = [
    "load_clip_weights", "load_image_state_dict", "load_official_checkpoint", "official_config",
    "infer_official_config", "official_filter_fn",
    "RELEASED_CONFIGS", "export_program", "export_onnx", "onnx_files", "read_checkpoint",
    "read_state_dict",
]
