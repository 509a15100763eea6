"""Decoders: torchcodec, decord and PyAV give the same frames over a codec/container matrix.

A test that needs a decoder this machine cannot run skips, naming why and what to install
(``decoder_status()``): torchcodec needs FFmpeg's shared libraries (CI installs them; a fresh
machine has none, and that case is tested here too, in a subprocess that hides them). PyAV
bundles FFmpeg and always runs. Tiny videos only (<= 24 frames, <= 64 px).
"""
import ctypes.util
import itertools
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


def needs(*names):
    """Skip unless every decoder in ``names`` decodes here; the skip says why and the fix."""
    for name in names:
        why = decoder_status()[name]
        if why is not None:
            pytest.skip(f"decoder {name} cannot run here: {why}")


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


def test_pyav_always_decodes_here():
    assert decoder_status()["pyav"] is None  # it bundles FFmpeg: no system piece to miss


def test_torchcodec_decodes_where_ffmpeg_is_installed():
    """Where FFmpeg's shared libraries are installed (CI), torchcodec must really decode."""
    if ctypes.util.find_library("avutil") is None:
        pytest.skip(f"FFmpeg's shared libraries are not installed here: {dec.ffmpeg_install_hint()}")
    assert decoder_status()["torchcodec"] is None


def test_status_reasons_are_one_line_with_the_fix(tmp_path, monkeypatch):
    # the shape of torchcodec's loading report: first sentence, causes, one traceback per version
    report = RuntimeError(
        "Could not load libtorchcodec. Likely causes:\n  1. FFmpeg is not properly installed.\n"
        "  2. The PyTorch version is not compatible.\n[start of libtorchcodec loading traceback]\n"
        "FFmpeg version 6:\nTraceback (most recent call last):\n  File \"x\", line 1\n"
        "OSError: libavutil.so.58: cannot open shared object file: No such file or directory\n\n"
        "OSError: Could not load this library: /site/torchcodec/libtorchcodec_core6.so\n"
        "FFmpeg version 5:\nOSError: libavutil.so.57: cannot open shared object file: No such file\n"
        "[end of libtorchcodec loading traceback].")
    assert dec._one_line(report) == ("RuntimeError: Could not load libtorchcodec "
                                     "(libavutil.so.57/58 not found)")
    mismatch = RuntimeError("Could not load libtorchcodec. Likely causes:\n FFmpeg version 5:\n"
                            "OSError: /site/libtorchcodec_core5.so: undefined symbol: _ZN3c10\n")
    assert dec._one_line(mismatch).endswith("(OSError: /site/libtorchcodec_core5.so: undefined symbol: "
                                            "_ZN3c10)")

    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    for text, hint in [('ID=debian\nVERSION_ID="12"\n', "apt-get install ffmpeg"),
                       ('ID=ubuntu\nID_LIKE=debian\n', "apt-get install ffmpeg"),
                       ('ID=linuxmint\nID_LIKE="ubuntu debian"\n', "apt-get install ffmpeg"),
                       ('ID="fedora"\n', "dnf install ffmpeg-free"),
                       ('ID=nixos\n', "with the system's packages")]:
        (tmp_path / "os-release").write_text(text)
        assert hint in dec.ffmpeg_install_hint(str(tmp_path / "os-release")), text
    if os.path.isfile("/etc/os-release") and "debian" in dec._os_ids():  # this machine (and CI)
        assert dec.ffmpeg_install_hint() == "apt-get install ffmpeg"


_HIDE_FFMPEG = textwrap.dedent("""
    # torchcodec loads libtorchcodec_coreN.so through ctypes; fail those loads as a machine
    # without FFmpeg's libavutil.so.(52+N) would
    import ctypes, json, logging, re, sys
    real_init = ctypes.CDLL.__init__
    def init(self, name, *a, **k):
        m = re.search(r"libtorchcodec_core(\\d+)", str(name))
        if m:
            raise OSError(f"libavutil.so.{52 + int(m.group(1))}: cannot open shared object file: "
                          "No such file or directory")
        return real_init(self, name, *a, **k)
    ctypes.CDLL.__init__ = init
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="LOG %(message)s")
    from zeroi2v.data import VideoReader, available_decoders, check_decoder, decoder_status
    out = {"status": decoder_status(), "available": available_decoders()}
    try:
        check_decoder("torchcodec")
    except ValueError as e:
        out["named"] = str(e)
    decoded = []
    for _ in range(2):
        r = VideoReader(sys.argv[1])
        decoded.append([r.decoder, r.get_batch([0, 2]).mean(axis=(1, 2, 3)).tolist()])
    out["decoded"] = decoded
    print(json.dumps(out))
""")


def test_fresh_machine_without_ffmpeg_libraries(tmp_path):
    """Where torchcodec cannot load FFmpeg's libraries, the status says so with the fix, ``auto``
    says once that it reads without torchcodec and decodes through the next decoder, and naming
    torchcodec is refused with the fix. Runs on any machine: the subprocess hides the libraries."""
    ref = level_frames(3, 32, 64)
    write_video(tmp_path / "v.mp4", ref)
    script = tmp_path / "hide_ffmpeg.py"
    script.write_text(_HIDE_FFMPEG)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "v.mp4")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    why = out["status"]["torchcodec"]
    hint = dec.ffmpeg_install_hint()
    assert why.startswith("torchcodec cannot load FFmpeg's shared libraries here (libavutil.so.")
    assert "not found" in why and why.endswith(f": {hint}") and "\n" not in why and "Likely" not in why
    assert out["status"]["pyav"] is None and "torchcodec" not in out["available"]
    assert out["named"].startswith("decoder 'torchcodec' cannot be used here: " + why)
    assert "set decoder 'auto'" in out["named"]
    logs = [ln for ln in proc.stderr.splitlines() if ln.startswith("LOG ")]
    assert logs == [f"LOG decoder 'auto' reads videos without torchcodec: {why} (reported once)"]
    for name, means in out["decoded"]:
        assert name == out["available"][0]
        np.testing.assert_allclose(means, ref[[0, 2]].mean(axis=(1, 2, 3)), atol=3)


@pytest.mark.parametrize("name", DECODERS)
def test_each_decoder_reads_the_matrix(matrix, name):
    needs(name)
    for path, ref, size in matrix:
        t = len(ref)
        idx = list(range(t))[::-1] + [0, t // 2, 0]  # unsorted, with repeats
        if name == "decord" and size in DECORD_FAILS:
            with pytest.raises(VideoDecodeError, match=path.name):
                VideoReader(path, name).get_batch(idx)
            continue
        r = VideoReader(path, name)
        assert len(r) == t and (r.height, r.width) == size, path.name
        frames = r.get_batch(idx)
        assert frames.shape == (len(idx),) + ref.shape[1:] and frames.dtype == np.uint8
        assert r.decoder == name
        # frame i is frame i: each decoded frame is nearest to its own source frame
        err = np.abs(frames[:, None].astype(float) - ref[None].astype(float)).mean((2, 3, 4))
        assert err.argmin(1).tolist() == idx, path.name
        assert err.min(1).max() < 6.0, path.name


@pytest.mark.parametrize("a, b", list(itertools.combinations(DECODERS, 2)))
def test_decoders_agree_on_the_matrix(matrix, a, b):
    needs(a, b)
    compared = 0
    for path, ref, size in matrix:
        if "decord" in (a, b) and size in DECORD_FAILS:
            continue
        idx = list(range(len(ref)))
        fa, fb = (VideoReader(path, n).get_batch(idx).astype(int) for n in (a, b))
        diff = np.abs(fa - fb)
        assert diff.mean() <= MEAN_TOL, (path.name, diff.mean())
        assert (diff <= CLOSE).mean() >= CLOSE_FRACTION, path.name
        compared += 1
    assert compared >= len(matrix) - len(LENGTHS)


def test_auto_reads_every_file_of_the_matrix(matrix):
    for path, ref, _ in matrix:
        idx = [len(ref) - 1, 0]
        auto = VideoReader(path)  # decord's failures included: the next decoder reads those
        np.testing.assert_array_equal(auto.get_batch(idx), VideoReader(path, auto.decoder).get_batch(idx))


def test_pyav_seeking_matches_sequential_decoding(tmp_path):
    """Short GOPs with B-frames: PyAV seeks to keyframes; its frames equal a full sequential decode
    (and torchcodec's, where it runs)."""
    ref = level_frames(24, 32, 64, seed=3)
    path = tmp_path / "gop.mp4"
    write_video(path, ref, codec="h264", options={"g": "5", "bframes": "2", "keyint_min": "5"})
    pyav = VideoReader(path, "pyav")
    assert len(pyav) == 24 and len(pyav._backend._key_pos) >= 4  # several keyframes: seeks happen
    sequential = dec._PyAVBackend(str(path))
    sequential._pts = None  # the path taken for streams without timestamps
    full = sequential.get_batch(list(range(24)))
    err = np.abs(full[:, None].astype(float) - ref[None].astype(float)).mean((2, 3, 4))
    assert err.argmin(1).tolist() == list(range(24))  # the sequential decode is in order
    for idx in ([23], [0, 23], [6, 7, 8, 19], [22, 3, 3, 11], list(range(24))):
        np.testing.assert_array_equal(pyav.get_batch(idx), full[idx])
    if decoder_status()["torchcodec"] is None:
        np.testing.assert_array_equal(VideoReader(path, "torchcodec").get_batch(range(24)), full)


def test_broken_files_name_the_file(tmp_path):
    good = tmp_path / "good.mp4"
    write_video(good, level_frames(6, 32, 64))
    noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)
    (tmp_path / "noise.mp4").write_bytes(noise.tobytes())
    (tmp_path / "half.mp4").write_bytes(good.read_bytes()[:300])
    (tmp_path / "empty.webm").write_bytes(b"")
    usable = [d for d in DECODERS if decoder_status()[d] is None]
    for name in ("noise.mp4", "half.mp4", "empty.webm", "missing.mkv"):
        for decoder in usable + ["auto"]:
            with pytest.raises(VideoDecodeError, match=name) as e:
                VideoReader(tmp_path / name, decoder).get_batch([0])
            assert e.value.path.endswith(name)
            # refused at the header, before any decoder opens it
            reason = "file not found" if name == "missing.mkv" else "not a readable video ("
            assert e.value.reason.startswith(reason), e.value.reason
    with pytest.raises(VideoDecodeError, match="out of range"):
        VideoReader(good).get_batch([6])


def test_auto_falls_back_per_file_and_says_so_once(matrix, monkeypatch, caplog):
    needs("decord")
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
    gone = ("torchcodec cannot load FFmpeg's shared libraries here (libavutil.so.59 not found): "
            "apt-get install ffmpeg")
    monkeypatch.setattr(dec, "_load_error", lambda name: gone if name == "torchcodec" else None)
    with pytest.raises(ValueError) as e:
        check_decoder("torchcodec")
    assert str(e.value) == (f"decoder 'torchcodec' cannot be used here: {gone}; or set decoder 'auto' "
                            "(usable here: decord, pyav)")
    assert check_decoder("decord") == "decord" and dec.available_decoders() == ["decord", "pyav"]
    monkeypatch.setattr(dec, "_load_error", lambda name: f"{name} is not installed: pip install {name}")
    with pytest.raises(ValueError, match="no video decoder is usable here: torchcodec: torchcodec is not "
                                         "installed: pip install torchcodec; decord: "):
        check_decoder("auto")


def test_decode_error_survives_a_dataloader_worker():
    """DataLoader workers re-raise with one message (the traceback): the last line is kept."""
    for cls in ("VideoDecodeError", "VideoTooLargeError"):
        e = VideoDecodeError("Caught VideoDecodeError in DataLoader worker process 0.\nOriginal Traceback:\n"
                             f"  File x\nzeroi2v.data.decoders.{cls}: cannot read video 'a.mp4': bad\n")
        assert str(e) == "cannot read video 'a.mp4': bad"
