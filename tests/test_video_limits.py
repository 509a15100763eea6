"""Video limits (zeroi2v.limits): a video's frame size is checked from its stream header before
any decoder opens it, and a batch of decoded frames against the memory limit. An 8K clip of a
few KB (solid colours) once made ``predict`` use 5.3 GB."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from zeroi2v import settings
from zeroi2v.data import (
    DECODERS,
    SkippedVideo,
    VideoDecodeError,
    VideoReader,
    VideoTooLargeError,
    build_dataset,
    decoder_status,
    write_annotations,
    write_video,
)
from zeroi2v.limits import LimitError

W8K, H8K = 7680, 4320


def write_8k(path, frames=3):
    """A 7680x4320 H.264 clip of solid grey frames: ~12 KB, written frame by frame."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = W8K, H8K, "yuv420p"
        s.options = {"preset": "veryfast", "crf": "51"}
        frame = av.VideoFrame.from_ndarray(np.full((H8K, W8K, 3), 90, np.uint8), format="rgb24")
        for _ in range(frames):
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("limits")
    write_8k(d / "8k.mp4")
    write_video(d / "small.mp4", np.full((8, 48, 64, 3), 120, np.uint8))
    return d


def test_8k_is_refused_at_the_header_by_every_decoder(videos, monkeypatch):
    assert (videos / "8k.mp4").stat().st_size < 64_000
    from zeroi2v.data import decoders as dec

    usable = [d for d in DECODERS if decoder_status()[d] is None]  # probed before counting opens
    opened = []
    for name, cls in list(dec._BACKENDS.items()):
        monkeypatch.setitem(dec._BACKENDS, name,
                            lambda path, cls=cls, name=name: opened.append(name) or cls(path))
    for decoder in usable + ["auto"]:
        with pytest.raises(VideoTooLargeError) as e:
            VideoReader(videos / "8k.mp4", decoder)
        assert isinstance(e.value, VideoDecodeError) and isinstance(e.value, LimitError)
        assert str(e.value) == (
            f"cannot read video '{videos / '8k.mp4'}': frames of 7680x4320 (33.2 Mpx) are over the "
            "8.8 Mpx limit: re-encode the videos smaller once (zeroi2v prepare SRC DST --short-side 256), "
            "or raise ZEROI2V_MAX_VIDEO_PIXELS")
    assert opened == []  # no decoder saw the file
    with settings.override(max_video_pixels=W8K * H8K):  # allowed when asked for
        r = VideoReader(videos / "8k.mp4", "pyav")
        assert (r.width, r.height, len(r)) == (W8K, H8K, 3)


def test_pixel_limit_is_exact(videos):
    with settings.override(max_video_pixels=64 * 48):
        assert VideoReader(videos / "small.mp4").get_batch([0]).shape == (1, 48, 64, 3)
    with settings.override(max_video_pixels=64 * 48 - 1), pytest.raises(VideoTooLargeError, match="64x48"):
        VideoReader(videos / "small.mp4")


def test_decoded_frames_are_checked_against_the_memory_limit(videos):
    r = VideoReader(videos / "small.mp4")
    with settings.override(memory_limit=5 * 64 * 48 * 3):
        assert r.get_batch([0, 1, 2, 3, 4]).shape == (5, 48, 64, 3)  # exactly at the limit
        with pytest.raises(VideoTooLargeError) as e:
            r.get_batch([0, 1, 2, 3, 4, 4])  # repeats count: they are returned as copies
    assert "decoding 6 frames of 64x48 needs 55.3 KB, over the memory limit of 46.1 KB: sample fewer " \
           "frames" in e.value.reason and "ZEROI2V_MEMORY_LIMIT" in e.value.reason


def test_dataset_treats_a_too_large_video_as_unreadable(videos, tmp_path):
    ann = tmp_path / "ann.txt"
    write_annotations(ann, [("small.mp4", 0), ("8k.mp4", 1), ("small.mp4", 1)])
    kw = dict(num_frames=4, sampling="uniform", size=16, short_side=16, rand_augment=None)
    test = build_dataset(ann, videos, train=False, on_error="skip", **kw)
    item = test[1]
    assert isinstance(item, SkippedVideo) and item.path.endswith("8k.mp4") and "7680x4320" in item.reason
    train = build_dataset(ann, videos, train=True, on_error="skip", **kw)
    assert train[1][1] == 1 and [p for p, _ in train[1].skipped] == [str(videos / "8k.mp4")]
    with pytest.raises(VideoTooLargeError, match="8k.mp4"):
        build_dataset(ann, videos, train=False, on_error="raise", **kw)[1]


_MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    from zeroi2v.cli import main
    t = time.time()
    rc = main(sys.argv[1:])
    print(json.dumps({"rc": rc, "s": time.time() - t,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def test_predict_refuses_8k_in_one_line_with_bounded_memory(videos, tmp_path):
    """``zeroi2v predict`` on the 8K clip: exit 2, one line, peak memory no higher than predicting
    a small clip (it used 2.7 GB here before the check, 5.3 GB in the report)."""
    from zeroi2v import create_video_model

    model = create_video_model("vit_base_patch16_224", 4, 3, img_size=16, patch_size=8, embed_dim=32,
                               depth=1, num_heads=4)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "measure.py").write_text(_MEASURE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = {}
    for name in ("small.mp4", "8k.mp4"):
        cmd = ["predict", str(tmp_path / "model"), str(videos / name), "--json"]
        proc = subprocess.run([sys.executable, str(tmp_path / "measure.py"), *cmd], capture_output=True,
                              text=True, timeout=300, env=env)
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr
    (ok, _), (refused, err) = runs["small.mp4"], runs["8k.mp4"]
    assert ok["rc"] == 0 and refused["rc"] == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("zeroi2v predict: error:")]
    assert errors == [f"zeroi2v predict: error: cannot read video '{videos / '8k.mp4'}': frames of "
                      "7680x4320 (33.2 Mpx) are over the 8.8 Mpx limit: re-encode the videos smaller once "
                      "(zeroi2v prepare SRC DST --short-side 256), or raise ZEROI2V_MAX_VIDEO_PIXELS"], err
    assert "Traceback" not in err
    assert refused["peak_mb"] < ok["peak_mb"] + 64, (refused, ok)
    assert refused["s"] < 60


def test_prepare_shrinks_the_8k_clip_the_limit_refuses(videos, tmp_path):
    """The fix the refusal names: prepare reads past ZEROI2V_MAX_VIDEO_PIXELS (it exists to shrink
    such videos) and still checks what decoding asks of memory before the first frame."""
    from zeroi2v.data import prepare_videos

    src = tmp_path / "src"
    src.mkdir()
    (src / "8k.mp4").write_bytes((videos / "8k.mp4").read_bytes())
    with settings.override(memory_limit=W8K * H8K * 3):  # less than the frames decoding keeps in flight
        res = prepare_videos(src, tmp_path / "low", short_side=16, progress=False)
    assert res["converted"] == 0 and res["failed"][0][0] == "8k.mp4"
    assert res["failed"][0][1].startswith("LimitError: decoding frames of 7680x4320 (")
    res = prepare_videos(src, tmp_path / "dst", short_side=16, progress=False)
    assert res["converted"] == 1
    r = VideoReader(tmp_path / "dst/8k.mp4")
    assert (r.width, r.height, len(r)) == (28, 16, 3)
