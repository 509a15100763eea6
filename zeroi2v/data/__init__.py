"""Video data: annotation files, frame samplers, transforms, the dataset and a synthetic demo set.

Public interface:
    CLIP_MEAN, CLIP_STD          CLIP pixel statistics on the 0-255 scale
    read_annotations(path)       "relative/path.mp4 label" lines -> [(path, label)]
    DenseSampler, UniformSampler frame indices (num_clips, clip_len) for a video of n frames
    VideoTransform               train augmentation / test views + CLIP normalisation
    VideoDataset, build_dataset  the dataset (decord, per-sample errors skipped or raised)
    make_synthetic_dataset       temporal-order-only toy dataset (real mp4 files)
    write_video                  PyAV mp4 writer (H.264, else MPEG-4)
"""
from .annotations import read_annotations, write_annotations
from .dataset import (SSV2_FLIP_LABEL_MAP, VideoDataset, build_dataset, collate_drop_failures,
                      symmetric_label_map)
from .sampling import DenseSampler, UniformSampler
from .synthetic import SYNTHETIC_CLASSES, make_synthetic_dataset, render_base_clip, synthetic_orders
from .transforms import CLIP_MEAN, CLIP_STD, VideoTransform, normalize
from .video_io import VideoDecodeError, count_video_frames, open_video, read_video_frames, write_video

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "read_annotations", "write_annotations", "DenseSampler", "UniformSampler",
    "VideoTransform", "normalize", "VideoDataset", "build_dataset", "collate_drop_failures",
    "SSV2_FLIP_LABEL_MAP", "symmetric_label_map", "make_synthetic_dataset", "SYNTHETIC_CLASSES",
    "synthetic_orders", "render_base_clip", "write_video", "read_video_frames", "open_video",
    "count_video_frames", "VideoDecodeError",
]
