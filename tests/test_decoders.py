"""Decoders: torchcodec, decord and PyAV give the same frames over a codec/container matrix.

Every decoder must be usable here (CI installs FFmpeg's shared libraries for torchcodec). Tiny
videos only (<= 24 frames, <= 64 px).
"""
import itertools
import logging

import numpy as np
import pytest

from zeroi2v.data import (
    DECODERS,
    VideoDecodeError,
    VideoReader,
    check_decoder,
    decoder_status,
    write_video,
)
from zeroi2v.data import decoders as dec

# (codec, container, height, width): odd sizes where the codec allows them (H.264's yuv420p does not)
MATRIX = [("h264", "mp4", 48, 64), ("h264", "mp4", 32, 48), ("mpeg4", "avi", 33, 47),
          ("vp9", "webm", 35, 50), ("mjpeg", "mkv", 33, 47)]
LENGTHS = (1, 2, 3, 17)
#: decord 0.6 cannot decode frames 48 px wide (its "from_size == to_size" check fails)
DECORD_FAILS = {(32, 48)}
#: The decoders upsample 4:2:0 chroma and convert YUV to RGB slightly differently, most visibly at
#: sharp colour edges (the saturated square below: up to ~60 grey levels on a few pixels). Between
#: any two decoders: mean |difference| <= 1 grey level and >= 95 % of values within 8.
MEAN_TOL, CLOSE, CLOSE_FRACTION = 1.0, 8, 0.95


def level_frames(t, h, w, seed=0):
    """A distinct brightness per frame (>= 10 grey levels apart), a gradient and a moving square."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    levels = rng.permutation(np.linspace(30, 200, t)) if t > 1 else np.array([120.0])
    base = levels[:, None, None, None] * np.array([1.0, 0.75, 0.5]) + (xx / w * 40 + yy / h * 20)[..., None]
    for i in range(t):
        y0 = (3 * i) % (h - 8)
        base[i, y0:y0 + 8, 2:10] = (220, 40, 90)
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    d = tmp_path_factory.mktemp("matrix")
    out = []
    for (codec, ext, h, w), t in itertools.product(MATRIX, LENGTHS):
        ref = level_frames(t, h, w, seed=t)
        path = d / f"{codec}_{h}x{w}_{t}.{ext}"
        assert write_video(path, ref, codec=codec) == codec
        out.append((path, ref, (h, w)))
    return out


def test_every_decoder_is_usable_here():
    assert decoder_status() == {name: None for name in DECODERS}


@pytest.mark.parametrize("k", range(len(MATRIX) * len(LENGTHS)))
def test_same_frames_from_every_decoder(matrix, k):
    path, ref, size = matrix[k]
    t = len(ref)
    idx = list(range(t))[::-1] + [0, t // 2, 0]  # unsorted, with repeats
    got = {}
    for name in DECODERS:
        if name == "decord" and size in DECORD_FAILS:
            with pytest.raises(VideoDecodeError, match=path.name):
                VideoReader(path, name).get_batch(idx)
            continue
        r = VideoReader(path, name)
        assert len(r) == t, name
        frames = r.get_batch(idx)
        assert frames.shape == (len(idx),) + ref.shape[1:] and frames.dtype == np.uint8
        assert r.decoder == name
        # frame i is frame i: each decoded frame is nearest to its own source frame
        err = np.abs(frames[:, None].astype(float) - ref[None].astype(float)).mean((2, 3, 4))
        assert err.argmin(1).tolist() == idx, name
        assert err.min(1).max() < 6.0, name
        got[name] = frames.astype(int)
    assert len(got) >= 2
    for a, b in itertools.combinations(got, 2):
        diff = np.abs(got[a] - got[b])
        assert diff.mean() <= MEAN_TOL, (a, b, diff.mean())
        assert (diff <= CLOSE).mean() >= CLOSE_FRACTION, (a, b)
    auto = VideoReader(path)  # auto reads every file, decord's failures included
    np.testing.assert_array_equal(auto.get_batch(idx), got[auto.decoder])


def test_pyav_seeking_matches_sequential_decoding(tmp_path):
    """Short GOPs with B-frames: PyAV seeks to keyframes; frames equal torchcodec's and a full decode."""
    ref = level_frames(24, 32, 64, seed=3)
    path = tmp_path / "gop.mp4"
    write_video(path, ref, codec="h264", options={"g": "5", "bframes": "2", "keyint_min": "5"})
    pyav = VideoReader(path, "pyav")
    assert len(pyav) == 24 and len(pyav._backend._key_pos) >= 4  # several keyframes: seeks happen
    full = VideoReader(path, "torchcodec").get_batch(range(24))
    for idx in ([23], [0, 23], [6, 7, 8, 19], [22, 3, 3, 11], list(range(24))):
        np.testing.assert_array_equal(pyav.get_batch(idx), full[idx])
    sequential = dec._PyAVBackend(str(path))
    sequential._pts = None  # the path taken for streams without timestamps
    np.testing.assert_array_equal(sequential.get_batch([4, 17, 2]), full[[4, 17, 2]])


def test_broken_files_name_the_file_and_each_decoder(tmp_path):
    good = tmp_path / "good.mp4"
    write_video(good, level_frames(6, 32, 64))
    noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)
    (tmp_path / "noise.mp4").write_bytes(noise.tobytes())
    (tmp_path / "half.mp4").write_bytes(good.read_bytes()[:300])
    (tmp_path / "empty.webm").write_bytes(b"")
    for name in ("noise.mp4", "half.mp4", "empty.webm", "missing.mkv"):
        for decoder in DECODERS:
            with pytest.raises(VideoDecodeError, match=name) as e:
                VideoReader(tmp_path / name, decoder).get_batch([0])
            assert e.value.path.endswith(name)
        with pytest.raises(VideoDecodeError) as e:
            VideoReader(tmp_path / name).get_batch([0])
        if name != "missing.mkv":  # auto says what each decoder said
            assert all(f"{d}:" in e.value.reason for d in DECODERS), e.value.reason
    with pytest.raises(VideoDecodeError, match="out of range"):
        VideoReader(good).get_batch([6])


def test_auto_falls_back_and_says_so_once(matrix, monkeypatch, caplog):
    path = next(p for p, _, size in matrix if size in DECORD_FAILS)
    monkeypatch.setattr(dec, "available_decoders", lambda: ["decord", "pyav"])
    monkeypatch.setattr(dec, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="zeroi2v.data"):
        for _ in range(2):
            r = VideoReader(path)
            r.get_batch([0])
            assert r.decoder == "pyav"
    assert caplog.text.count("decoder decord failed") == 1 and path.name in caplog.text


def test_decoder_setting_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="decoder must be 'auto' or one of"):
        check_decoder("ffmpeg")
    monkeypatch.setattr(dec, "_load_error", lambda name: "RuntimeError: could not load libtorchcodec"
                        if name == "torchcodec" else None)
    with pytest.raises(ValueError, match="torchcodec.*could not load.*apt-get install libavcodec59"):
        check_decoder("torchcodec")
    assert check_decoder("decord") == "decord" and dec.available_decoders() == ["decord", "pyav"]


def test_decode_error_survives_a_dataloader_worker():
    """DataLoader workers re-raise with one message (the traceback): the last line is kept."""
    e = VideoDecodeError("Caught VideoDecodeError in DataLoader worker process 0.\nOriginal Traceback:\n"
                         "  File x\nzeroi2v.data.decoders.VideoDecodeError: cannot read video 'a.mp4': bad\n")
    assert str(e) == "cannot read video 'a.mp4': bad"
