"""``zeroi2v prepare``: a generated tree with class folders, a corrupt file, interrupted and resumed."""
import os
from pathlib import Path

import numpy as np
import pytest

from test_decoders import level_frames
from zeroi2v.cli import main
from zeroi2v.data import VideoReader, build_dataset, prepare_videos, read_annotations, write_video
from zeroi2v.data import prepare as prep


def _brightness(frames):
    return frames.reshape(len(frames), -1).mean(1)


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    refs = {
        "jump/a.mp4": (level_frames(12, 48, 64, seed=1), "h264"),
        "jump/deep/b.mkv": (level_frames(10, 33, 47, seed=2), "mjpeg"),
        "run/c.avi": (level_frames(9, 64, 40, seed=3), "mpeg4"),
        "run/d.webm": (level_frames(3, 40, 40, seed=4), "vp9"),
    }
    for rel, (frames, codec) in refs.items():
        write_video(src / rel, frames, fps=12, codec=codec)
    (src / "run/broken.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 2000, np.uint8).tobytes())
    (src / "run/notes.txt").write_text("not a video")
    (src / "run/.hidden.mp4").write_bytes(b"")
    return src, {k: v[0] for k, v in refs.items()}


def test_prepare_interrupted_then_resumed(tree, tmp_path, monkeypatch):
    src, refs = tree
    dst = tmp_path / "dst"
    calls = []
    real = prep._transcode

    def interrupted(s, tmp, *a):
        calls.append(s)
        if len(calls) == 2:  # half-written, then Ctrl-C
            Path(tmp).write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(s, tmp, *a)

    monkeypatch.setattr(prep, "_transcode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_videos(src, dst, short_side=32, progress=False)
    done = dst / "jump/a.mp4"
    assert done.is_file() and not (dst / "jump/deep/b.mp4").exists()
    assert not list(dst.rglob(".*"))  # the interrupted temporary was removed
    stamp = done.stat().st_mtime_ns
    stale = dst / "run" / ".c.mp4.999.zeroi2v-part.mp4"  # what a killed run leaves behind
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    monkeypatch.setattr(prep, "_transcode", real)

    res = prepare_videos(src, dst, short_side=32, workers=2, progress=False)
    assert (res["converted"], res["existing"]) == (3, 1)
    assert [rel for rel, _ in res["failed"]] == ["run/broken.mp4"] and res["failed"][0][1]
    assert done.stat().st_mtime_ns == stamp  # finished outputs are kept, not redone
    assert not stale.exists() and not list(dst.rglob(".*"))
    assert (dst / "prepare_failed.txt").read_text().startswith("run/broken.mp4\t")
    ann = read_annotations(dst / "annotations.txt")
    assert ann == [("jump/a.mp4", 0), ("jump/deep/b.mp4", 0), ("run/c.mp4", 1), ("run/d.mp4", 1)]
    assert (dst / "classes.txt").read_text().split() == ["jump", "run"]
    for rel, ref in refs.items():
        r = VideoReader(dst / Path(rel).with_suffix(".mp4"))
        frames = r.get_batch(range(len(r)))
        h, w = frames.shape[1:3]
        assert len(r) == len(ref) and min(h, w) == 32 and max(h, w) % 2 == 0
        assert abs(max(h, w) / min(h, w) - max(ref.shape[1:3]) / min(ref.shape[1:3])) < 0.1
        np.testing.assert_allclose(_brightness(frames), _brightness(ref), atol=4)  # same frames, in order
    ds = build_dataset(dst / "annotations.txt", dst, num_frames=2, sampling="uniform", train=False, size=32)
    assert [ds[i][1] for i in range(len(ds))] == [0, 0, 1, 1]

    again = prepare_videos(src, dst, short_side=32, progress=False)  # nothing left to do
    assert (again["converted"], again["existing"], len(again["failed"])) == (0, 4, 1)


@pytest.mark.parametrize("fps, source_frames", [(6, [0, 2, 4, 6, 8, 10]), (24, np.repeat(np.arange(12), 2))])
def test_prepare_fps(tmp_path, fps, source_frames):
    ref = level_frames(12, 32, 48, seed=5)
    write_video(tmp_path / "src/v.mp4", ref, fps=12)
    res = prepare_videos(tmp_path / "src", tmp_path / "dst", short_side=32, fps=fps, progress=False)
    assert res["annotations"] is None  # no class folders
    r = VideoReader(tmp_path / "dst/v.mp4")
    got = _brightness(r.get_batch(range(len(r))))
    assert len(r) == len(source_frames)
    nearest = np.abs(got[:, None] - _brightness(ref)[None]).argmin(1)
    assert nearest.tolist() == list(source_frames)


def test_prepare_errors_and_cli(tmp_path, capsys):
    src = tmp_path / "src"
    write_video(src / "k/x.mp4", level_frames(4, 32, 32))
    for kw, msg in [(dict(short_side=33), "even"), (dict(fps=0), "fps"), (dict(workers=0), "workers")]:
        with pytest.raises(ValueError, match=msg):
            prepare_videos(src, tmp_path / "dst", progress=False, **kw)
    with pytest.raises(ValueError, match="must differ"):
        prepare_videos(src, src, progress=False)
    with pytest.raises(ValueError, match="source folder not found"):
        prepare_videos(tmp_path / "nope", tmp_path / "dst", progress=False)
    write_video(src / "k/x.avi", level_frames(4, 32, 32), codec="mpeg4")
    with pytest.raises(ValueError, match="would both become k/x.mp4"):
        prepare_videos(src, tmp_path / "dst", progress=False)
    os.remove(src / "k/x.avi")
    assert main(["prepare", str(src), str(src / "out"), "--short-side", "16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "prepared 1 videos, 0 already done, 0 unreadable, of 1" in out and "annotations.txt" in out
    assert main(["prepare", str(src), str(src / "out"), "--no-progress"]) == 0  # dst inside src: not an input
    assert "0 videos, 1 already done" in capsys.readouterr().out
    assert main(["prepare", str(src), str(tmp_path / "o"), "--short-side", "15"]) == 2
    assert "zeroi2v prepare: error: --short-side must be an even number" in capsys.readouterr().err
