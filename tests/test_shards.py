"""Sharded video datasets (issue #26): ``prepare --shards`` writes what ``prepare`` writes, read
back as the same clips; ranks x workers read each video once per epoch, deterministically; the
same steps on every rank; evaluation over shards equals evaluation over files; a corrupt sample
follows ``data.on_error``; ``prepare --shards`` resumes; training resumes exactly. Tiny data."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from _helpers import interrupt_transcode_at
from zeroi2v.cli import main
from zeroi2v.data import (
    ShardedVideoDataset,
    ShardStream,
    SkippedVideo,
    VideoDecodeError,
    build_dataset,
    make_synthetic_dataset,
    pack_shards,
    prepare_shards,
    prepare_videos,
    read_annotations,
    write_annotations,
)
from zeroi2v.data.shards import buffer_shuffle, epoch_plan
from zeroi2v.safe_io import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]
TINY = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 4}
SHARD = 5000  # bytes: two or three of these 16 px videos per shard
CLIP = dict(num_frames=4, sampling="uniform", size=16, short_side=16, rand_augment=(5, 2))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    syn = make_synthetic_dataset(base / "syn", num_classes=2, videos_per_class=6, num_frames=8,
                                 size=16, seed=0, val_fraction=0.0)
    src = Path(syn["root"]) / "videos"
    files = prepare_videos(src, base / "files", short_side=16, progress=False)
    shards = prepare_shards(src, base / "sh", short_side=16, shard_size=SHARD, workers=2,
                            progress=False)
    return {"base": base, "src": src, "files": base / "files", "ann": files["annotations"],
            "index": shards["index"], "res": shards}


def _ds(data, train, index=None, **kw):
    """The files dataset, or (``index``) the same over a shard index."""
    ann, root = (index, "") if index else (data["ann"], data["files"])
    return build_dataset(ann, root, train=train, **{**CLIP, **kw})


def _indices(batch):
    return [s.index if not isinstance(s, SkippedVideo) else ("dropped", s.index) for s in batch]


# ------------------------------------------------------------------------------ what is written
def test_shards_hold_the_prepared_videos_and_give_the_same_clips(data):
    index = json.loads(Path(data["index"]).read_text())
    ann = read_annotations(data["ann"])
    rows = [(s["file"], r) for s in index["shards"] for r in s["samples"]]
    assert index["complete"] and index["num_samples"] == len(ann) == 12
    assert index["classes"] == ["backward", "forward"] and len(index["shards"]) >= 4
    for i, ((rel, label), (shard, (path, lab, offset, size))) in enumerate(zip(ann, rows)):
        assert (path, lab) == (rel, label)  # annotation order and labels
        with tarfile.open(Path(data["index"]).parent / shard) as tar:
            meta = json.loads(tar.extractfile(f"{i:08d}.json").read())
            assert tar.extractfile(f"{i:08d}.cls").read() == str(label).encode()
            f = tar.fileobj
            f.seek(offset)
            got = f.read(size)
        assert meta == {"path": rel, "source": rel, "label": label, "class": rel.split("/")[0]}
        assert got == (data["files"] / rel).read_bytes(), rel  # exactly what prepare wrote
    # ordinary tar files with WebDataset's member naming: <key>.mp4 / .cls / .json
    with tarfile.open(Path(data["index"]).parent / index["shards"][0]["file"]) as tar:
        assert tar.getnames()[:3] == ["00000000.mp4", "00000000.cls", "00000000.json"]

    for train in (True, False):
        files, shards = _ds(data, train), _ds(data, train, data["index"])
        assert isinstance(shards, ShardedVideoDataset) and len(shards) == len(files)
        for epoch in (0, 3):
            files.set_epoch(epoch)
            shards.set_epoch(epoch)
            for i in range(len(files)):
                (a, la), (b, lb) = files[i], shards[i]
                assert la == lb and torch.equal(a, b), (train, epoch, i)
    hidden = [p for p in Path(data["index"]).parent.iterdir() if p.name.startswith(".")]
    assert [p.name for p in hidden] == [LOCK_FILE]  # no temporaries, no staging folder left


# ------------------------------------------------------------------------------ epochs
def test_two_ranks_two_workers_read_each_video_once_per_epoch(data):
    videos = _ds(data, True, data["index"])
    seen, per_rank = {}, {}
    for epoch in (0, 1):
        for rank in (0, 1):
            stream = ShardStream(videos, rank=rank, world_size=2, shuffle_buffer=3, batch_size=2)
            stream.set_epoch(epoch)
            batches = {w: [_indices(b) for b in DataLoader(stream, batch_size=2, num_workers=w,
                                                           collate_fn=list)] for w in (0, 2)}
            assert batches[0] == batches[2]  # the same batches whatever the number of workers
            per_rank[epoch, rank] = [i for b in batches[2] for i in b]
            assert len(batches[2]) == len(stream) // 2 == 3
        seen[epoch] = per_rank[epoch, 0] + per_rank[epoch, 1]
        assert sorted(seen[epoch]) == list(range(12)), epoch  # each video once, across ranks
    assert per_rank[0, 0] != per_rank[1, 0]  # each epoch its own order
    again = ShardStream(videos, rank=0, world_size=2, shuffle_buffer=3, batch_size=2)
    again.set_epoch(1)
    assert again.plan().tolist() == per_rank[1, 0]  # a pure function of (seed, epoch, rank)
    other = ShardStream(videos, rank=0, world_size=2, shuffle_buffer=3, batch_size=2, seed=9)
    other.set_epoch(1)
    assert other.plan().tolist() != per_rank[1, 0]

    # the same items as the files dataset gives for those indices (per-sample randomness)
    files = _ds(data, True)
    files.set_epoch(1)
    stream = ShardStream(videos, rank=1, world_size=2, batch_size=2)
    stream.set_epoch(1)
    for item in list(stream)[:3]:
        assert torch.equal(item[0], files[item.index][0]) and item[1] == files[item.index][1]


@pytest.mark.parametrize("sizes, world", [([3, 2, 4], 2), ([1, 1, 1, 1, 1, 1, 1], 3), ([5], 4),
                                          ([2, 7, 1, 3], 5), ([4, 4], 1)])
def test_uneven_counts_leave_out_fewer_than_the_ranks_and_keep_ranks_equal(sizes, world):
    n = sum(sizes)
    left_out = set()
    for epoch in range(20):
        plans = [epoch_plan(sizes, seed=1, epoch=epoch, rank=r, world_size=world, shuffle_buffer=3)
                 for r in range(world)]
        read = np.concatenate(plans)
        assert {len(p) for p in plans} == {n // world}  # every rank the same count
        assert len(set(read.tolist())) == len(read) == n - n % world  # none twice, < world left out
        left_out |= set(range(n)) - set(read.tolist())
    if n % world:
        assert len(left_out) > n % world  # others each epoch (not always a shard's last)


def test_every_rank_takes_the_same_number_of_steps(data, tmp_path):
    """11 videos over 2 ranks, batch 2, the trainer's drop_last: 5 samples and 2 full batches on
    each rank, as many as the loader's len says (DDP waits for every rank's gradients)."""
    ann = tmp_path / "eleven.txt"
    write_annotations(ann, read_annotations(data["ann"])[:11])
    res = pack_shards(ann, data["files"], tmp_path / "sh", shard_size=SHARD)
    assert res["num_samples"] == 11 and res["shards"] > 1
    videos = _ds(data, True, res["index"], on_error="drop")
    for workers in (0, 2):
        got = []
        for rank in (0, 1):
            stream = ShardStream(videos, rank=rank, world_size=2, batch_size=2)
            loader = DataLoader(stream, batch_size=2, num_workers=workers, drop_last=True, collate_fn=list)
            batches = list(loader)
            assert len(stream) == 5 and len(batches) == len(loader) == 2
            got += [s.index for b in batches for s in b]
        assert len(set(got)) == len(got) == 8


def test_shuffle_buffer_is_a_permutation_that_keeps_reads_near_their_order():
    rng = np.random.default_rng(0)
    items = np.arange(500) * 3
    for size in (1, 7, 64, 1000):
        out = buffer_shuffle(items, size, np.random.default_rng(size))
        assert sorted(out.tolist()) == items.tolist()
        pos = {x: k for k, x in enumerate(out.tolist())}
        assert all(pos[x] >= k - size + 1 for k, x in enumerate(items.tolist()))  # never far earlier
        assert size == 1 or out.tolist() != items.tolist()
    assert buffer_shuffle(items, 1, rng).tolist() == items.tolist()


# ------------------------------------------------------------------------------ evaluation
def test_evaluation_over_shards_equals_evaluation_over_files(data):
    from zeroi2v import create_video_model
    from zeroi2v.train.evaluation import ShardSampler, evaluate

    torch.manual_seed(0)
    model = create_video_model("vit_base_patch16_224", 4, 2, head_offsets=[1, -1, 0, 0], **TINY)
    kw = dict(num_clips=2, num_crops=3)
    files, shards = _ds(data, False, **kw), _ds(data, False, data["index"], **kw)
    a = evaluate(model, files, 5, torch.device("cpu"), 2)
    b = evaluate(model, shards, 5, torch.device("cpu"), 2, num_workers=2)
    assert a["num_videos"] == b["num_videos"] == a["num_samples"] == b["num_samples"] == 12
    for k in ("top1", "mean_class_acc", "confusion_matrix", "num_skipped"):
        assert a[k] == b[k], k
    np.testing.assert_array_equal(a["probs"], b["probs"])
    # the ranks' slices: every video once, none padded (what evaluate gathers by index)
    parts = [ShardSampler(len(shards), r, 5).indices() for r in range(5)]
    assert sorted(i for p in parts for i in p) == list(range(12))


# ------------------------------------------------------------------------------ bad samples
@pytest.fixture
def corrupt(data, tmp_path):
    """A copy of the shards with sample 4's video bytes replaced by noise (same size)."""
    dst = tmp_path / "bad"
    shutil.copytree(Path(data["index"]).parent, dst, ignore=shutil.ignore_patterns(LOCK_FILE))
    index = json.loads((dst / "shards.json").read_text())
    rows = [(s["file"], r) for s in index["shards"] for r in s["samples"]]
    shard, (path, _, offset, size) = rows[4]
    with open(dst / shard, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())
    return {"index": str(dst / "shards.json"), "name": f"{dst / shard}:{path}", "dst": dst, "rows": rows}


def test_a_corrupt_sample_in_a_shard_follows_on_error(data, corrupt):
    from zeroi2v import create_video_model
    from zeroi2v.train.evaluation import evaluate

    skip = _ds(data, True, corrupt["index"], on_error="skip")
    skip.set_epoch(0)
    item = skip[4]  # replaced by the next readable sample, which keeps its own label
    assert item.index == 5 and [p for p, _ in item.skipped] == [corrupt["name"]]
    files = _ds(data, True)
    files.set_epoch(0)
    assert torch.equal(item[0], files[5][0]) and item[1] == files[5][1]
    dropped = _ds(data, True, corrupt["index"], on_error="drop")[4]
    assert isinstance(dropped, SkippedVideo) and dropped.path == corrupt["name"] and dropped.reason
    with pytest.raises(VideoDecodeError, match="shard-.*tar:") as e:
        _ds(data, True, corrupt["index"], on_error="raise")[4]
    assert e.value.path == corrupt["name"] and "/proc/self" not in str(e.value)

    # in a training epoch over 2 ranks: counted once, every other video still read once
    stream = [ShardStream(skip, rank=r, world_size=2, batch_size=3) for r in (0, 1)]
    for s in stream:
        s.set_epoch(0)
    items = [x for s in stream for x in s]
    assert sum(len(x.skipped) for x in items) == 1 and len(items) == 12

    # evaluation: left out and listed, never replaced; metrics over the 11 others
    torch.manual_seed(0)
    model = create_video_model("vit_base_patch16_224", 4, 2, head_offsets=[1, -1, 0, 0], **TINY)
    m = evaluate(model, _ds(data, False, corrupt["index"]), 4, torch.device("cpu"), 2)
    assert (m["num_videos"], m["num_samples"], m["num_skipped"]) == (12, 11, 1)
    assert m["skipped"][0]["path"] == corrupt["name"] and 4 not in m["indices"].tolist()


def test_limits_apply_to_videos_in_shards(data):
    """The pixel limit is read from the sample's stream header, and its bytes are checked
    against the memory limit before they are read; both name the shard and the video."""
    from zeroi2v import settings
    from zeroi2v.data import VideoTooLargeError

    ds = _ds(data, False, data["index"], on_error="raise")
    name = ds.samples[0][0]
    with settings.override(max_video_pixels=100):
        with pytest.raises(VideoTooLargeError, match="Mpx limit") as e:
            ds[0]
    assert e.value.path == name and "/proc/self" not in str(e.value)
    with settings.override(memory_limit=1000):
        with pytest.raises(VideoTooLargeError, match=f"reading {re.escape(name)} needs .* memory limit"):
            ds[0]
    assert isinstance(_ds(data, False, data["index"], on_error="drop")[0], tuple)  # limits restored


def test_shards_that_do_not_match_their_index(data, corrupt, tmp_path):
    dst, rows = corrupt["dst"], corrupt["rows"]
    shard, (_, _, offset, _) = rows[7]
    with open(dst / shard, "r+b") as f:  # the member header before sample 7 names another one
        f.seek(offset - 512)
        f.write(b"00000099.mp4\0")
    with pytest.raises(VideoDecodeError, match="does not match its index"):
        _ds(data, False, corrupt["index"], on_error="raise")[7]
    with open(dst / shard, "r+b") as f:  # a shard cut short: refused when the index is read
        f.truncate(offset)
    with pytest.raises(ValueError, match=f"{shard} is {offset} bytes where the index says"):
        _ds(data, False, corrupt["index"])
    (dst / shard).unlink()
    with pytest.raises(ValueError, match="copy every shard beside the index"):
        _ds(data, False, corrupt["index"])
    bad = tmp_path / "other.json"
    bad.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a zeroi2v shard index"):
        _ds(data, False, str(bad))
    index = json.loads(Path(corrupt["index"]).read_text())
    for classes in (5, "fb", {"a": 1}, [1, 2]):  # (a string would be read as one class a letter)
        bad.write_text(json.dumps(dict(index, classes=classes)))
        with pytest.raises(ValueError, match='its "classes" are not a list of names'):
            _ds(data, False, str(bad))


# ------------------------------------------------------------------------------ prepare --shards
def _tar_digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).glob("shard-*.tar"))}


def test_prepare_shards_resumes_after_an_interruption(data, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    interrupt_transcode_at(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(data["src"], dst, short_side=16, shard_size=SHARD, progress=False)
    index = json.loads((dst / "shards.json").read_text())
    kept = {s["file"]: (dst / s["file"]).stat().st_mtime_ns for s in index["shards"]}
    assert not index["complete"] and 1 <= len(kept) < len(data["res"]) and index["num_samples"] < 8
    assert sorted(p.name for p in dst.glob("shard-*")) == sorted(kept)  # the open shard was removed
    assert not [p for p in dst.rglob(".*") if p.name != LOCK_FILE]  # no temporaries, no staging

    # what a killed run leaves: a shard renamed but not yet in the index, a temporary, staging
    (dst / f"shard-{len(kept):06d}.tar").write_bytes(b"complete but unlisted")
    (dst / f".shard-{len(kept) + 1:06d}.tar.999-0badc0de.zeroi2v-part.tar").write_bytes(b"x")
    (dst / ".999-0badc0de.zeroi2v-staging").mkdir()
    monkeypatch.undo()  # the real transcoder again
    with pytest.raises(ValueError, match=re.escape(
            f"the shards in {dst} were written with other settings (short_side 16 -> 32; crf 23 -> 30): "
            f"rerun the command that made them, or choose another destination, or remove "
            f"{dst / 'shards.json'} and the shard-*.tar files")):
        prepare_shards(data["src"], dst, short_side=32, crf=30, shard_size=SHARD, progress=False)
    assert (dst / f"shard-{len(kept):06d}.tar").exists()  # refused before anything was removed
    res = prepare_shards(data["src"], dst, short_side=16, shard_size=SHARD, progress=False)
    assert res["existing"] == index["num_samples"] and res["converted"] == 12 - res["existing"]
    assert (res["removed"], res["dropped_shards"]) == (2, 1)
    assert all((dst / f).stat().st_mtime_ns == t for f, t in kept.items())  # complete shards kept
    assert not [p for p in dst.rglob(".*") if p.name != LOCK_FILE]
    # the same shards, byte for byte, as one uninterrupted run with 2 workers
    assert _tar_digests(dst) == _tar_digests(Path(data["index"]).parent)
    again = prepare_shards(data["src"], dst, short_side=16, shard_size=SHARD, progress=False)
    assert (again["converted"], again["existing"]) == (0, 12)
    old = json.loads((dst / "shards.json").read_text())
    (dst / "shards.json").write_text(json.dumps({**old, "version": 0}))
    with pytest.raises(ValueError, match="shard format version 0, this zeroi2v writes 1"):
        prepare_shards(data["src"], dst, short_side=16, shard_size=SHARD, progress=False)


def test_classes_number_the_shards_and_a_changed_list_is_refused(data, tmp_path, capsys):
    src = tmp_path / "src"
    for cls in ("backward", "forward"):  # one video of each class: quick
        (src / cls).mkdir(parents=True)
        shutil.copy(sorted((data["src"] / cls).glob("*.mp4"))[0], src / cls / "v.mp4")
    names = tmp_path / "names.txt"
    names.write_text("forward\nstill\nbackward\n")  # a model's order, with a class not here
    dst = tmp_path / "dst"
    assert main(["prepare", str(src), str(dst), "--shards", "--short-side", "16", "--classes",
                 str(names), "--no-progress"]) == 0
    index = json.loads((dst / "shards.json").read_text())
    assert index["classes"] == ["forward", "still", "backward"]
    assert index["settings"]["classes"] == ["forward", "still", "backward"]
    rows = [r[:2] for s in index["shards"] for r in s["samples"]]
    assert rows == [["backward/v.mp4", 2], ["forward/v.mp4", 0]]
    assert (dst / "classes.txt").read_text() == "forward\nstill\nbackward\n"
    with tarfile.open(dst / index["shards"][0]["file"]) as tar:
        assert tar.extractfile("00000000.cls").read() == b"2"
        assert json.loads(tar.extractfile("00000000.json").read())["class"] == "backward"
    capsys.readouterr()
    before = (dst / "shards.json").read_bytes()
    names.write_text("forward\nbackward\n")
    for args, change in [(["--classes", str(names)], "classes 3 names -> 2 names, name 2 'still' -> "
                                                     "'backward'"),
                         ([], "classes 3 names -> sorted folder names")]:
        assert main(["prepare", str(src), str(dst), "--shards", "--short-side", "16", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"were written with other settings ({change}): " in err, err
    names.write_text("forward\nstill\nbackward\n")
    shutil.copy(src / "forward/v.mp4", src / "forward/w.mp4")  # same settings, other videos
    assert main(["prepare", str(src), str(dst), "--shards", "--short-side", "16", "--classes",
                 str(names)]) == 2
    assert f"{dst} holds shards of other videos (another SRC, or videos added, removed or renamed " \
           "since): rerun the command" in capsys.readouterr().err
    assert (dst / "shards.json").read_bytes() == before
    names.write_text("forward\n")  # a class folder the list lacks: refused before DST exists
    assert main(["prepare", str(src), str(tmp_path / "new"), "--shards", "--classes", str(names)]) == 2
    assert "class folder backward of " in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_cli_messages(data, tmp_path, capsys):
    src = data["src"]
    assert main(["prepare", str(src), str(tmp_path / "a"), "--shards", "--shard-size", "20KB",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "prepared 12 videos" in out and f"index: {tmp_path / 'a' / 'shards.json'}" in out
    for args, msg in [(["--shard-size", "1GB"], "add --shards"),
                      (["--shards", "--shard-size", "lots"], "--shard-size must be a size")]:
        assert main(["prepare", str(src), str(tmp_path / "b"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next(src.rglob("*.mp4")), flat / "v.mp4")
    assert main(["prepare", str(flat), str(tmp_path / "c"), "--shards"]) == 2
    assert "class folders" in capsys.readouterr().err
    index = tmp_path / "a" / "shards.json"
    raw = json.loads(index.read_text())
    index.write_text(json.dumps({**raw, "complete": False}))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "vit_base_patch16_224", "timm_kwargs": TINY,
                                             "num_frames": 4, "head_offsets": [1, -1, 0, 0]},
                                   "data": {"train_ann": str(index), "size": 16}}))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unfinished zeroi2v prepare --shards run" in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ training
def _cfg(data, tmp, **train):
    from zeroi2v.train.config import load_config

    return load_config(None, base={
        "model": {"name": "vit_base_patch16_224", "timm_kwargs": TINY, "num_frames": 4,
                  "head_offsets": [1, -1, 0, 0], "head_dropout": 0.5},
        "data": {"train_ann": data["index"], "val_ann": data["index"], "sampling": "uniform",
                 "size": 16, "short_side": 16, "rand_augment": [5, 2], "num_workers": 0,
                 "shuffle_buffer": 4},
        "eval": {"num_clips": 1, "interval": 0, "batch_size": 6},
        "train": {"epochs": 3, "batch_size": 4, "lr": 1e-3, "scale_lr": False, "progress": False,
                  "out_dir": str(tmp), **train}})


def test_training_on_shards_resumes_exactly(data, tmp_path):
    from zeroi2v.train.engine import train

    torch.manual_seed(1)
    full = train(_cfg(data, tmp_path / "a"))
    torch.manual_seed(1)
    part = train(_cfg(data, tmp_path / "b", stop_after_epoch=1, progress=True))
    assert part["epoch"] == 1
    torch.manual_seed(5)
    resumed = train(_cfg(data, tmp_path / "b", progress=True), resume="auto")
    assert resumed["step"] == full["step"] == 9 and resumed["train_loss"] == full["train_loss"]
    for (k, a), b in zip(full["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed["val"]["num_samples"] == 12


def test_torchrun_two_ranks_train_on_shards(data, tmp_path):
    """2 CPU processes (gloo) over 11 videos: 5 per rank, the same steps on both (no hang), and
    evaluation over the shards sharded between the ranks equals one process's."""
    from test_cli import _free_port

    ann = tmp_path / "eleven.txt"
    write_annotations(ann, read_annotations(data["ann"])[:11])
    eleven = pack_shards(ann, data["files"], tmp_path / "sh", shard_size=SHARD)["index"]
    cfg = _cfg({**data, "index": eleven}, tmp_path / "run", epochs=2, batch_size=2).to_dict()
    cfg["data"]["num_workers"] = 1
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "zeroi2v.cli"]
    r = subprocess.run(cmd + ["train", str(tmp_path / "c.yaml")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    epochs = [x for x in log if x["type"] == "epoch"]
    assert [x["step"] for x in epochs] == [2, 4]  # 5 videos per rank: 2 full batches of 2
    (setup,) = [x for x in log if x["type"] == "setup"]
    assert (setup["world_size"], setup["train_samples"], setup["steps_per_epoch"]) == (2, 11, 2)
    ck = tmp_path / "run/last"
    r = subprocess.run(cmd + ["eval", str(ck), "--out", str(tmp_path / "e2.json"), "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(["eval", str(ck), "--out", str(tmp_path / "e1.json"), "--no-progress"]) == 0
    m1, m2 = (json.loads((tmp_path / f).read_text()) for f in ("e1.json", "e2.json"))
    assert m2["world_size"] == 2 and m1["num_samples"] == m2["num_samples"] == 11
    for k in ("top1", "mean_class_acc", "confusion_matrix"):
        assert m1[k] == m2[k], k


def test_classes_in_the_sorted_order_are_the_default_numbering(data, tmp_path):
    """--classes naming the folders in sorted order numbers the shards as no --classes does, so
    it resumes (or reruns) such an index instead of being refused as another numbering."""
    from zeroi2v.data.shard_writer import prepare_shards

    src = tmp_path / "src"
    for cls in ("backward", "forward"):
        (src / cls).mkdir(parents=True)
        shutil.copy(sorted((data["src"] / cls).glob("*.mp4"))[0], src / cls / "v.mp4")
    dst = tmp_path / "dst"
    prepare_shards(src, dst, short_side=16, progress=False)
    again = prepare_shards(src, dst, short_side=16, classes=["backward", "forward"], progress=False)
    assert again["existing"] == 2 and again["converted"] == 0
    assert "classes" not in json.loads((dst / "shards.json").read_text())["settings"]
