"""Training clips/s from tar shards against the same videos as files, on this machine's cores:
one process with 0 and 2 DataLoader workers, and 2 simulated ranks (2 processes, as under
torchrun: one thread each, each reading its half of the epoch).

    pytest benchmarks/test_bench_shards.py --benchmark-only --benchmark-json=shards.json   # ~1 min*
    python benchmarks/test_bench_shards.py shards.json                                     # table

(*) the first run also generates the videos, about a minute more.

Videos: ``VIDEOS`` clips of 10 s at 30 fps and 340x256 (a Kinetics video after ``zeroi2v
prepare``), generated as ``benchmarks/test_bench_data.py`` generates them, cached in pytest's
cache folder; the shards hold the same bytes (``pack_shards``, five or six videos a shard).
Pipeline: the Kinetics recipe's training pipeline (dense 8x16x1, RandomResizedCrop 224, flip,
RandAugment m7-n4), decoder PyAV, one torch thread per process: DataLoader workers and
torchrun's ranks run so, and the main process with torch's default 2 threads measured 4-6
clips/s against 20-21 with one, for files and shards alike, while other jobs loaded this shared
VM (OpenMP threads contending), which would bury the comparison. One round = one epoch over all
videos (batch 1, workers started per epoch as the trainer does). Files and shards are timed back
to back in every round (alternating which goes first: the VM is shared and drifts); the claim is
the median of the per-round ratios (shards / files), in ``extra_info`` with the medians.

This measures what shards cost on a local disk (one ranged read into an in-memory file per
video, the epoch plan). What they save, fewer and larger files on network storage, cannot be
measured on this machine.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import statistics
import sys

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from zeroi2v.data import ShardStream, build_dataset, collate_videos, pack_shards, write_annotations
from zeroi2v.train.demo import rotating_times

VIDEOS = 16  # of test_bench_data.SECONDS at its FPS
SHARD_SIZE = 1_500_000
PIPELINE = dict(num_frames=8, sampling="dense", frame_interval=16, train=True, size=224, short_side=256,
                rand_augment=(7, 4), flip=True, on_error="raise", decoder="pyav")
ROUNDS, WARMUP = 9, 1


def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


@pytest.fixture(scope="session")
def shard_bench_data(request):
    pytest.importorskip("av", reason="the benchmark videos are written with PyAV (pip install av)")
    from test_bench_data import write_bench_video

    root = request.config.cache.mkdir("zeroi2v-bench-shard-videos")
    lines = []
    for i in range(VIDEOS):
        rel = f"c{i % 2}/v{i:02d}.mp4"
        path = os.path.join(root, rel)
        write_bench_video(path, 256, 340, seed=100 + i)
        lines.append((rel, i % 2))
    ann = os.path.join(root, "videos.txt")
    write_annotations(ann, lines)
    res = pack_shards(ann, root, os.path.join(root, "shards"), shard_size=SHARD_SIZE, classes=["c0", "c1"])
    return {"ann": ann, "root": str(root), "index": res["index"], "shards": res["shards"],
            "bytes": res["bytes"]}


def _files_loader(d, rank, world, workers, epoch):
    ds = build_dataset(d["ann"], d["root"], **PIPELINE)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
    sampler.set_epoch(epoch)
    ds.set_epoch(epoch)
    return DataLoader(ds, batch_size=1, sampler=sampler, num_workers=workers, collate_fn=collate_videos)


def _shards_loader(d, rank, world, workers, epoch):
    stream = ShardStream(build_dataset(d["index"], "", **PIPELINE), rank=rank, world_size=world)
    stream.set_epoch(epoch)
    return DataLoader(stream, batch_size=1, num_workers=workers, collate_fn=collate_videos)


def _epoch(make, d, rank, world, workers, epoch) -> int:
    n = 0
    for video, _, _ in make(d, rank, world, workers, epoch):
        assert video.shape == (1, 3, 8, 224, 224)
        n += 1
    return n


def _rank_process(make, d, rank, world, epoch, out):
    torch.set_num_threads(1)  # torchrun's default for several processes per machine
    out.put(_epoch(make, d, rank, world, 0, epoch))


def _ranks(make, d, world, epoch) -> int:
    """One epoch read by ``world`` processes at once (forked: no import per round)."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_process, args=(make, d, r, world, epoch, q)) for r in range(world)]
    for p in procs:
        p.start()
    counts = []
    while len(counts) < world:  # a rank that fails ends the benchmark at once
        try:
            counts.append(q.get(timeout=1))
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not failed, f"a rank process failed (exit codes {failed})"
    for p in procs:
        p.join()
        assert p.exitcode == 0
    return sum(counts)


SETTINGS = {"1 process, 0 workers": (1, 0), "1 process, 2 workers": (1, 2), "2 ranks, 0 workers each": (2, 0)}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_shards_vs_files_clips_per_s(benchmark, shard_bench_data, setting):
    d = shard_bench_data
    world, workers = SETTINGS[setting]
    benchmark.group = f"shards vs files: {setting}"
    epochs = {"files": 0, "shards": 0}
    counts = {"files": [], "shards": []}

    def run(kind, make):
        def one_epoch():
            epochs[kind] += 1
            n = (_ranks(make, d, world, epochs[kind]) if world > 1
                 else _epoch(make, d, 0, 1, workers, epochs[kind]))
            counts[kind].append(n)
        return one_epoch

    times = {}
    load = _load()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in DataLoader workers and torchrun's ranks (see the docstring)
    try:
        benchmark.pedantic(lambda: times.update(rotating_times(
            {"files": run("files", _files_loader), "shards": run("shards", _shards_loader)}, ROUNDS,
            WARMUP)), rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    assert set(counts["files"]) == {VIDEOS} and set(counts["shards"]) == {VIDEOS}  # each video once
    ratios = [s / f for f, s in zip(times["files"], times["shards"])]
    benchmark.extra_info.update(
        kind="shards_vs_files", setting=setting, world=world, workers=workers, videos=VIDEOS,
        shards=d["shards"], shard_bytes=d["bytes"],
        files_clips_per_s=VIDEOS / statistics.median(times["files"]),
        shards_clips_per_s=VIDEOS / statistics.median(times["shards"]),
        paired_ratio_median=statistics.median(ratios),
        paired_ratio_quartiles=statistics.quantiles(ratios, n=4),
        baseline_median_s=statistics.median(times["files"]),
        candidate_median_s=statistics.median(times["shards"]),
        rounds=ROUNDS, torch_threads=1, load_1min=load, load_1min_after=_load())


@pytest.mark.parametrize("source", ["files", "shards"])
def test_bytes_to_decoder_per_video(benchmark, shard_bench_data, source):
    """What a video costs before decoding: the file's bytes read (the decoders read them once
    more themselves), or for a shard the ranged read into the in-memory file they open."""
    from zeroi2v.data import ShardIndex, read_annotations

    d = shard_bench_data
    benchmark.group = "bytes to the decoder, per video"
    if source == "files":
        paths = [os.path.join(d["root"], rel) for rel, _ in read_annotations(d["ann"])]

        def one_pass():
            for p in paths:
                with open(p, "rb") as f:
                    f.read()
    else:
        index = ShardIndex.load(d["index"])

        def one_pass():
            for i in range(len(index)):
                with index.local_file(i):
                    pass
    benchmark.pedantic(one_pass, rounds=20, warmup_rounds=2, iterations=1)
    benchmark.extra_info.update(kind="bytes_per_video", source=source,
                                ms_per_video=benchmark.stats.stats.median / VIDEOS * 1e3)


def table(bench: dict) -> str:
    rows = [b["extra_info"] for b in bench["benchmarks"] if b["extra_info"].get("kind") == "shards_vs_files"]
    out = ["| setting | files clips/s | shards clips/s | shards time / files time (median of "
           "rounds, quartiles) | 1-min load |", "|---|---|---|---|---|"]
    for e in rows:
        q = e["paired_ratio_quartiles"]
        out.append(f"| {e['setting']} | {e['files_clips_per_s']:.2f} | {e['shards_clips_per_s']:.2f} | "
                   f"{e['paired_ratio_median']:.3f} ({q[0]:.3f}-{q[2]:.3f}) | "
                   f"{e['load_1min']:.1f}-{e['load_1min_after']:.1f} |")
    per = {b["extra_info"]["source"]: b["extra_info"]["ms_per_video"] for b in bench["benchmarks"]
           if b["extra_info"].get("kind") == "bytes_per_video"}
    if per:
        out += ["", "| bytes to the decoder | ms per video |", "|---|---|"]
        out += [f"| {k} | {v:.3f} |" for k, v in per.items()]
    return "\n".join(out)


if __name__ == "__main__":
    import json

    print(table(json.load(open(sys.argv[1]))))
