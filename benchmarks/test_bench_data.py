"""Does the data pipeline keep up with training? Clips/s of decode + sample + augment per decoder
and DataLoader worker count, against one ViT-B/16 training step on the same machine.

    pytest benchmarks/test_bench_data.py --benchmark-only --benchmark-json=data.json   # ~15 min, 2 cores
    python benchmarks/test_bench_data.py data.json benchmarks/results/cpu/data_clips_per_s.png

Videos: generated once into pytest's cache folder (``.pytest_cache/d/zeroi2v-bench-videos``, not
committed), 10 s at 30 fps, a textured scene panning with a moving disk, H.264 as x264 writes it
by default (preset veryfast, crf 23, 3 B-frames, a keyframe every 250 frames), at 340x256 (a
Kinetics video resized to short side 256) and 1280x720. Pipelines are the recipes' training
pipelines: Kinetics dense 8x16x1 and SSv2 uniform 32 frames, short side 256, RandomResizedCrop
224, flip, RandAugment m7-n4 (+ RandomErasing 0.25 for SSv2). One round = one pass of the
DataLoader (batch 1) over ``CLIPS`` samples; workers persist across rounds.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from zeroi2v.data import DECODERS, build_dataset, collate_videos, write_annotations

RESOLUTIONS = {"340x256": (256, 340), "1280x720": (720, 1280)}
SAMPLINGS = {"dense_8x16x1": dict(num_frames=8, sampling="dense", frame_interval=16, random_erasing=0.0),
             "uniform_32": dict(num_frames=32, sampling="uniform", random_erasing=0.25)}
WORKERS = (0, 1, 2)
NUM_VIDEOS, SECONDS, FPS = 4, 10, 30
CLIPS = {"340x256": 8, "1280x720": 4}
ROUNDS = 3


def _load() -> float:
    """1-minute load average (the VM is shared: recorded with every result)."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _frames(rng, h, w, n):
    """A detailed colour texture (4-px cells over 32-px blobs) panning right and down, a bright
    disk crossing it and a little sensor-like grain: at crf 23 about 1 Mbit/s at 720p, 0.3 at
    340x256, like camera videos (a clean pan alone compresses unrealistically well)."""
    th, tw = h + n, w + 2 * n
    fine = np.kron(rng.random((th // 4 + 2, tw // 4 + 2, 3), dtype=np.float32),
                   np.ones((4, 4, 1), np.float32))
    blob = np.kron(rng.random((th // 32 + 2, tw // 32 + 2, 3), dtype=np.float32),
                   np.ones((32, 32, 1), np.float32))
    tex = (30 + 60 * fine[:th, :tw] + 140 * blob[:th, :tw]).astype(np.uint8)
    grain = [rng.integers(-4, 5, (h, w, 3), dtype=np.int16) for _ in range(7)]
    yy, xx = np.mgrid[0:h, 0:w]
    r = h // 8
    for t in range(n):
        f = tex[t // 2:t // 2 + h, 2 * t:2 * t + w].copy()
        cy, cx = h // 2 + int(h / 3 * np.sin(t / 20)), int((t / n) * w)
        f[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (250, 230, 60)
        yield np.clip(f + grain[t % 7], 0, 255).astype(np.uint8)


def write_bench_video(path: str, h: int, w: int, seed: int) -> None:
    """A camera-like H.264 file of ``SECONDS`` at ``FPS`` (``_frames``), unless it exists
    (written under a temporary name: an interrupted session leaves no half file)."""
    import av

    from zeroi2v.data.video_io import add_video_stream

    if os.path.isfile(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".part.mp4"
    with av.open(tmp, "w") as out:
        s = add_video_stream(out, "h264", w, h, FPS,
                             {"preset": "veryfast", "crf": "23", "bframes": "3", "g": "250"})
        for f in _frames(np.random.default_rng(seed), h, w, SECONDS * FPS):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    os.replace(tmp, path)


@pytest.fixture(scope="session")
def bench_videos(request):
    root = request.config.cache.mkdir("zeroi2v-bench-videos")
    anns = {}
    for res, (h, w) in RESOLUTIONS.items():
        lines = []
        for i in range(NUM_VIDEOS):
            rel = f"{res}/v{i}.mp4"
            path = os.path.join(root, rel)
            write_bench_video(path, h, w, seed=i)
            lines.append((rel, i % 2))
        anns[res] = os.path.join(root, f"{res}.txt")
        write_annotations(anns[res], lines)
    return str(root), anns


class _Repeat(torch.utils.data.Sampler):
    def __init__(self, n, clips):
        self.order = [i % n for i in range(clips)]

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("res", list(RESOLUTIONS))
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_pipeline_clips_per_s(benchmark, bench_videos, sampling, res, decoder, workers):
    root, anns = bench_videos
    benchmark.group = f"data {sampling} {res}"
    ds = build_dataset(anns[res], root, train=True, size=224, short_side=256, rand_augment=(7, 4), flip=True,
                       on_error="raise", decoder=decoder, **SAMPLINGS[sampling])
    clips = CLIPS[res]
    loader = torch.utils.data.DataLoader(ds, batch_size=1, sampler=_Repeat(len(ds), clips),
                                         num_workers=workers, persistent_workers=workers > 0,
                                         collate_fn=collate_videos)
    shapes = []
    load = _load()

    def one_pass():
        for video, _, _ in loader:
            shapes.append(tuple(video.shape))

    benchmark.pedantic(one_pass, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    t = SAMPLINGS[sampling]["num_frames"]
    assert set(shapes) == {(1, 3, t, 224, 224)} and len(shapes) == clips * (ROUNDS + 1)
    benchmark.extra_info.update(kind="pipeline", sampling=sampling, resolution=res, decoder=decoder,
                                workers=workers, clips_per_round=clips,
                                clips_per_s=clips / benchmark.stats.stats.median,
                                torch_threads=torch.get_num_threads(), load_1min=load,
                                load_1min_after=_load())


@pytest.mark.parametrize("frames, batch", [(8, 2), (32, 1)])
def test_vit_b16_train_step(benchmark, frames, batch):
    """One optimiser step of the recipe's model (frozen ViT-B/16, adapters trained), fp32 CPU."""
    from zeroi2v import create_video_model

    benchmark.group = "ViT-B/16 training step"
    torch.manual_seed(0)
    model = create_video_model("vit_base_patch16_clip_quickgelu_224", num_frames=frames, num_classes=400,
                               head_offsets="vit_b" if frames == 8 else "vit_b_long").train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.05)
    x = torch.randn(batch, 3, frames, 224, 224)
    y = torch.randint(0, 400, (batch,))
    load = _load()

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(kind="train_step", frames=frames, batch=batch,
                                clips_per_s=batch / benchmark.stats.stats.median,
                                torch_threads=torch.get_num_threads(), load_1min=load,
                                load_1min_after=_load())


# ------------------------------------------------------------------------------- table and plot
def table(bench: dict) -> str:
    """Markdown: clips/s per pipeline (rows) and decoder x workers (columns), then the model steps."""
    rows = [b for b in bench["benchmarks"] if b["extra_info"].get("kind") == "pipeline"]
    steps = [b for b in bench["benchmarks"] if b["extra_info"].get("kind") == "train_step"]
    cols = [(d, w) for d in DECODERS for w in WORKERS]
    val = {(b["extra_info"]["sampling"], b["extra_info"]["resolution"], b["extra_info"]["decoder"],
            b["extra_info"]["workers"]): b["extra_info"]["clips_per_s"] for b in rows}
    out = ["| pipeline | " + " | ".join(f"{d} w{w}" for d, w in cols) + " |",
           "|---|" + "---|" * len(cols)]
    for s in SAMPLINGS:
        for r in RESOLUTIONS:
            cells = [f"{val[(s, r, d, w)]:.2f}" if (s, r, d, w) in val else "–" for d, w in cols]
            out.append(f"| {s} {r} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("| ViT-B/16 training step (fp32, frozen backbone + adapters) | median s | clips/s |")
    out.append("|---|---|---|")
    for b in steps:
        e = b["extra_info"]
        out.append(f"| {e['frames']} frames, batch {e['batch']} | {b['stats']['median']:.2f} | "
                   f"{e['clips_per_s']:.3f} |")
    return "\n".join(out)


def plot(bench: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [b["extra_info"] for b in bench["benchmarks"] if b["extra_info"].get("kind") == "pipeline"]
    steps = {e["frames"]: e["clips_per_s"] for e in (b["extra_info"] for b in bench["benchmarks"])
             if e.get("kind") == "train_step"}
    fig = Figure(figsize=(12, 7))
    FigureCanvasAgg(fig)
    for k, (s, r) in enumerate((s, r) for s in SAMPLINGS for r in RESOLUTIONS):
        ax = fig.add_subplot(2, 2, k + 1)
        for j, d in enumerate(DECODERS):
            ys = [next((e["clips_per_s"] for e in rows
                        if (e["sampling"], e["resolution"], e["decoder"], e["workers"]) == (s, r, d, w)),
                       0.0) for w in WORKERS]
            ax.bar(np.arange(len(WORKERS)) + (j - 1) * 0.27, ys, width=0.27, label=d)
        frames = SAMPLINGS[s]["num_frames"]
        if frames in steps:
            ax.axhline(steps[frames], color="k", ls="--", lw=1, label=f"ViT-B/16 step, {frames} frames")
        ax.set_xticks(range(len(WORKERS)), [f"{w} workers" for w in WORKERS])
        ax.set_ylabel("clips/s")
        ax.set_title(f"{s}, {r}")
        ax.legend(fontsize=7)
    fig.suptitle("training pipeline throughput (decode + sample + augment), this 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    import json

    data = json.load(open(sys.argv[1]))
    print(table(data))
    if len(sys.argv) > 2:
        plot(data, sys.argv[2])
