"""Video data: annotation files, frame samplers, transforms, the dataset and a synthetic demo set.

Public interface:
    CLIP_MEAN, CLIP_STD          CLIP pixel statistics on the 0-255 scale
    read_annotations(path)       "relative/path.mp4 label" lines -> [(path, label)]
    DenseSampler, UniformSampler frame indices (num_clips, clip_len) for a video of n frames
    VideoTransform               train augmentation / test views + CLIP normalisation
    VideoDataset, build_dataset  the dataset (unreadable videos replaced, dropped or raised; counted)
    collate_videos, LoadReport   collate_fn -> (video, label, report of skipped / short videos)
    VideoReader, DECODERS        one reader over torchcodec / decord / PyAV (decoder="auto" picks)
    make_synthetic_dataset       temporal-order-only toy dataset (real mp4 files)
    write_video                  PyAV writer (H.264 / MPEG-4 / VP9 / MJPEG)
    prepare_videos               re-encode a video tree for training (``zeroi2v prepare``)
    prepare_shards, pack_shards  the same into tar shards with an index (``prepare --shards``)
    ShardedVideoDataset          VideoDataset over a shard index (random access: evaluation)
    ShardStream                  training epochs over shards split between ranks and workers
"""
from .annotations import read_annotations, write_annotations
from .dataset import (
                      SSV2_FLIP_LABEL_MAP,
                      LoadReport,
                      SkippedVideo,
                      VideoDataset,
                      VideoSample,
                      build_dataset,
                      collate_videos,
                      symmetric_label_map,
)
from .decoders import (
                      AUTO_ORDER,
                      DECODERS,
                      VideoReader,
                      VideoTooLargeError,
                      available_decoders,
                      check_decoder,
                      decoder_status,
)
from .prepare import find_videos, prepare_videos
from .sampling import DenseSampler, UniformSampler
from .shard_writer import pack_shards, prepare_shards
from .shards import ShardedVideoDataset, ShardIndex, ShardStream, is_shard_index
from .synthetic import SYNTHETIC_CLASSES, make_synthetic_dataset, render_base_clip, synthetic_orders
from .transforms import CLIP_MEAN, CLIP_STD, VideoTransform, normalize
from .video_io import (
                      VideoDecodeError,
                      count_video_frames,
                      open_video,
                      read_video_frames,
                      write_video,
)

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "read_annotations", "write_annotations", "DenseSampler", "UniformSampler",
    "VideoTransform", "normalize", "VideoDataset", "build_dataset", "collate_videos",
    "VideoSample", "SkippedVideo", "LoadReport", "VideoReader", "DECODERS", "AUTO_ORDER",
    "available_decoders", "check_decoder", "decoder_status",
    "SSV2_FLIP_LABEL_MAP", "symmetric_label_map", "make_synthetic_dataset", "SYNTHETIC_CLASSES",
    "synthetic_orders", "render_base_clip", "write_video", "read_video_frames", "open_video",
    "count_video_frames", "VideoDecodeError", "VideoTooLargeError", "prepare_videos", "find_videos",
    "prepare_shards", "pack_shards", "ShardedVideoDataset", "ShardIndex", "ShardStream", "is_shard_index",
]
