"""``zeroi2v prepare``: a generated tree with class folders, a corrupt file, interrupted and resumed;
one run per destination; entries that are not files; unsafe names; a full disk; the umask."""
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from _helpers import interrupt_transcode_at
from test_decoders import level_frames
from zeroi2v.cli import main
from zeroi2v.data import VideoReader, build_dataset, prepare_videos, read_annotations, write_video
from zeroi2v.data import annotations as ann_mod
from zeroi2v.data import prepare as prep
from zeroi2v.safe_io import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]


def _hidden(dst):
    """Hidden files left in ``dst`` (temporaries), the lock file aside."""
    return [p for p in dst.rglob(".*") if p.name != LOCK_FILE]


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
    interrupt_transcode_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        prepare_videos(src, dst, short_side=32, progress=False)
    done = dst / "jump/a.mp4"
    assert done.is_file() and not (dst / "jump/deep/b.mp4").exists()
    assert not _hidden(dst)  # the interrupted temporary was removed
    stamp = done.stat().st_mtime_ns
    stale = dst / "run" / ".c.mp4.999-0badc0de.zeroi2v-part.mp4"  # what a killed run leaves behind
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    monkeypatch.undo()  # the real transcoder again

    res = prepare_videos(src, dst, short_side=32, workers=2, progress=False)
    assert (res["converted"], res["existing"], res["removed"], res["took_over"]) == (3, 1, 1, None)
    assert [rel for rel, _ in res["failed"]] == ["run/broken.mp4"] and res["failed"][0][1]
    assert done.stat().st_mtime_ns == stamp  # finished outputs are kept, not redone
    assert not stale.exists() and not _hidden(dst)
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
    # dst inside src: not an input
    assert main(["prepare", str(src), str(src / "out"), "--short-side", "16", "--no-progress"]) == 0
    assert "0 videos, 1 already done" in capsys.readouterr().out
    assert main(["prepare", str(src), str(tmp_path / "o"), "--short-side", "15"]) == 2
    assert "zeroi2v prepare: error: --short-side must be an even number" in capsys.readouterr().err


def _small_tree(root, names):
    """One tiny clip copied to every relative path of ``names`` (bytes or str)."""
    clip = root / "clip.mp4"
    if not clip.exists():
        write_video(clip, level_frames(3, 32, 32))
    for name in names:
        path = os.path.join(os.fsencode(root / "src"), os.fsencode(name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(clip, path)
    return root / "src"


_HOLD_LOCK = textwrap.dedent("""
    import sys
    from zeroi2v.safe_io import folder_lock
    with folder_lock(sys.argv[1], "zeroi2v prepare other-run"):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes stdin, or kills this process
""")


def test_one_run_per_destination_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    src = _small_tree(tmp_path, ["a/x.mp4", "b/y.mp4"])
    dst = tmp_path / "dst"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(dst)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        # the live run's temporary, as it would be mid-write
        theirs = dst / "a" / f".x.mp4.{holder.pid}-1234abcd.zeroi2v-part.mp4"
        theirs.parent.mkdir(parents=True)
        theirs.write_bytes(b"being written")
        assert main(["prepare", str(src), str(dst), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(
            f"zeroi2v prepare: error: {dst} is in use by another zeroi2v run (pid {holder.pid} on ")
        assert "`zeroi2v prepare other-run`" in err
        assert theirs.read_bytes() == b"being written" and not (dst / "a/x.mp4").exists()
    finally:
        holder.kill()  # dies holding the lock: the record stays in the lock file
        holder.wait()
    assert main(["prepare", str(src), str(dst), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"took over the lock of a run that stopped without releasing it (pid {holder.pid} on " in out
    assert "removed 1 temporary files of interrupted runs" in out
    assert not theirs.exists() and not _hidden(dst)
    assert "prepared 2 videos, 0 already done, 0 unreadable, of 2" in out


def test_entries_that_are_not_regular_files_are_listed_not_opened(tmp_path, capsys):
    src = _small_tree(tmp_path, ["k/good.mp4"])
    os.mkfifo(src / "k/pipe.mp4")  # opening it would wait for a writer forever
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "k/sock.mkv"))
    os.symlink(src / "k/nowhere.mp4", src / "k/gone.mp4")
    os.symlink(src / "k/good.mp4", src / "k/link.mp4")  # a link to a file is a video
    try:
        assert main(["prepare", str(src), str(tmp_path / "dst"), "--short-side", "16", "--no-progress"]) == 0
    finally:
        sock.close()
    out = capsys.readouterr().out
    assert "prepared 2 videos, 0 already done, 0 unreadable, 3 not regular files, of 5" in out
    listed = (tmp_path / "dst" / prep.FAILED_LIST).read_text().splitlines()
    assert listed == ["k/gone.mp4\tbroken symbolic link", "k/pipe.mp4\tnot a regular file (a FIFO)",
                      "k/sock.mkv\tnot a regular file (a socket)"]
    assert all(f"  skipped: {line.split(chr(9))[0]} (" in out for line in listed)
    assert read_annotations(tmp_path / "dst/annotations.txt") == [("k/good.mp4", 0), ("k/link.mp4", 0)]


def test_names_are_made_safe_for_annotation_files(tmp_path, capsys):
    names = ["play guitar/my clip.mp4", "play guitar/tab\there.avi", "#hash/x.mp4", b"cook/caf\xe9.mp4",
             "cook/ok.mp4"]
    src = _small_tree(tmp_path, names)
    dst = tmp_path / "dst"
    assert main(["prepare", str(src), str(dst), "--short-side", "16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "prepared 5 videos" in out and "4 output names made safe for annotation files (e.g. " in out
    assert read_annotations(dst / "annotations.txt") == [
        ("_hash/x.mp4", 0), ("cook/caf_.mp4", 1), ("cook/ok.mp4", 1), ("play_guitar/my_clip.mp4", 2),
        ("play_guitar/tab_here.mp4", 2)]
    assert (dst / "classes.txt").read_text().split("\n") == ["_hash", "cook", "play_guitar", ""]
    ds = build_dataset(dst / "annotations.txt", dst, num_frames=2, sampling="uniform", train=False, size=16)
    assert [ds[i][1] for i in range(len(ds))] == [0, 1, 1, 2, 2]


def test_clashing_safe_names_are_refused_before_anything_is_converted(tmp_path, capsys):
    src = _small_tree(tmp_path, ["k/a b.mp4", "k/a_b.mp4"])
    assert main(["prepare", str(src), str(tmp_path / "dst"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"zeroi2v prepare: error: {src / 'k/a b.mp4'} and {src / 'k/a_b.mp4'} would both become "
                   "k/a_b.mp4; rename one (nothing was converted)\n")
    assert not (tmp_path / "dst").exists()
    src = _small_tree(tmp_path / "2", ["x y/1.mp4", "x_y/2.mp4"])  # two classes would merge
    with pytest.raises(ValueError, match=r"folders .*x y and .*x_y would both become x_y"):
        prepare_videos(src, tmp_path / "dst2", progress=False)
    assert not (tmp_path / "dst2").exists()


class _FullDisk(prep._Sink):
    """From the ``n``-th output on, write to /dev/full: the real ENOSPC from PyAV's writes (or,
    where /dev/full is missing, an ENOSPC raised by the first write)."""

    calls = 0
    n = 1

    def __init__(self, tmp):
        type(self).calls += 1
        if type(self).calls < self.n:
            return super().__init__(tmp)
        import av

        self.tmp = tmp
        if os.path.exists("/dev/full"):
            self.container = self._call(av.open, "/dev/full", mode="w", format="mp4")
        else:
            self.container = self._call(self._no_space)

    def _no_space(self):
        raise OSError(errno.ENOSPC, "No space left on device", self.tmp)


def test_full_disk_stops_with_one_line_and_keeps_what_is_done(tree, tmp_path, monkeypatch, capsys):
    src, _ = tree
    dst = tmp_path / "dst"
    monkeypatch.setattr(_FullDisk, "n", 3)  # a, b written; broken.mp4 fails on its header; c hits it
    monkeypatch.setattr(prep, "_Sink", _FullDisk)
    assert main(["prepare", str(src), str(dst), "--short-side", "16", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"zeroi2v prepare: error: cannot write {dst / 'run/c.mp4'}: No space left on device; "
                   f"kept: 2 complete videos in {dst}, the unreadable inputs listed in "
                   f"{dst / 'prepare_failed.txt'}; free some space, then run the same command again to "
                   "resume\n")
    assert (dst / "prepare_failed.txt").read_text().startswith("run/broken.mp4\tnot a readable video (")
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.mp4")) == ["jump/a.mp4",
                                                                               "jump/deep/b.mp4"]
    assert not _hidden(dst) and not (dst / "annotations.txt").exists()
    monkeypatch.setattr(prep, "_Sink", _FullDisk.__mro__[1])  # space again: the run resumes
    res = prepare_videos(src, dst, short_side=16, progress=False)
    assert (res["converted"], res["existing"], len(res["failed"])) == (2, 2, 1)


def test_full_disk_on_the_annotation_file_keeps_the_old_one(tree, tmp_path, monkeypatch, capsys):
    src, _ = tree
    dst = tmp_path / "dst"
    prepare_videos(src, dst, short_side=16, progress=False)
    before = {n: (dst / n).read_bytes() for n in ("annotations.txt", "classes.txt", "prepare_failed.txt")}
    shutil.copyfile(src / "jump/a.mp4", src / "jump/e.mp4")

    real = ann_mod.write_text_atomic

    def full(path, text):  # the real atomic write, with the disk filling up half-way
        if Path(path).name != "annotations.txt":
            return real(path, text)
        with ann_mod.atomic_path(path) as tmp:
            tmp.write_text(text[:7])
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    monkeypatch.setattr(ann_mod, "write_text_atomic", full)
    assert main(["prepare", str(src), str(dst), "--short-side", "16", "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"zeroi2v prepare: error: cannot write {dst / 'annotations.txt'}: No space left on device; kept: "
        f"5 complete videos in {dst}, the unreadable inputs listed in {dst / 'prepare_failed.txt'}; free "
        "some space, then run the same command again to resume\n")
    assert {n: (dst / n).read_bytes() for n in before} == before and not _hidden(dst)
    monkeypatch.undo()
    assert main(["prepare", str(src), str(dst), "--short-side", "16", "--no-progress"]) == 0
    assert ("jump/e.mp4", 0) in read_annotations(dst / "annotations.txt")


def test_permission_error_names_the_path(tree, tmp_path, monkeypatch, capsys):
    import av

    real = av.open

    def no_write(path, mode="r", **kw):
        if mode == "w":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(path, mode, **kw)

    monkeypatch.setattr(av, "open", no_write)
    dst = tmp_path / "dst"
    assert main(["prepare", str(tree[0]), str(dst), "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"zeroi2v prepare: error: cannot write {dst / 'jump/a.mp4'}: Permission denied; no video was "
        "written; make it writable, then run the same command again to resume\n")


def test_outputs_and_lists_honour_the_umask(tree, tmp_path):
    old = os.umask(0o027)
    try:
        prepare_videos(tree[0], tmp_path / "dst", short_side=16, progress=False)
    finally:
        os.umask(old)
    dst = tmp_path / "dst"
    for rel in ("annotations.txt", "classes.txt", "prepare_failed.txt", "jump/a.mp4", "run/d.mp4"):
        assert (dst / rel).stat().st_mode & 0o777 == 0o640, rel
    assert (dst / "jump/deep").stat().st_mode & 0o777 == 0o750


# ------------------------------------------------------------------------------ --classes
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("zeroi2v prepare: error: "), err
    return err[len("zeroi2v prepare: error: "):-1]


def test_classes_file_numbers_the_folders_in_its_order(tmp_path, capsys):
    src = _small_tree(tmp_path, ["run/x.mp4", "jump/y.mp4", "play guitar/z.mp4"])
    names = tmp_path / "classes.txt"  # a trained model's order; 'sit' has no videos here
    names.write_text("sit\nrun\nplay guitar\njump\n")
    dst = tmp_path / "dst"
    assert main(["prepare", str(src), str(dst), "--short-side", "16", "--classes", str(names),
                 "--no-progress"]) == 0
    assert "annotation file: " in capsys.readouterr().out
    # 'play guitar' (source name) matches the folder written as play_guitar
    assert read_annotations(dst / "annotations.txt") == [("jump/y.mp4", 3), ("play_guitar/z.mp4", 2),
                                                         ("run/x.mp4", 1)]
    assert (dst / "classes.txt").read_text() == "sit\nrun\nplay guitar\njump\n"  # the whole list
    # the output name matches too (the classes.txt of an earlier prepare), and a list is taken
    res = prepare_videos(src, tmp_path / "dst2", short_side=16, progress=False,
                         classes=["play_guitar", "jump", "run"])
    assert read_annotations(res["annotations"]) == [("jump/y.mp4", 1), ("play_guitar/z.mp4", 0),
                                                    ("run/x.mp4", 2)]
    # without --classes: sorted folder names, as before
    res = prepare_videos(src, tmp_path / "dst3", short_side=16, progress=False)
    assert (tmp_path / "dst3/classes.txt").read_text().split() == ["jump", "play_guitar", "run"]


def test_bad_classes_are_refused_before_the_destination_is_touched(tmp_path, capsys):
    src = _small_tree(tmp_path, ["run/x.mp4", "jump/y.mp4", "walk/w.mp4", "sit/s.mp4", "eat/e.mp4"])
    dst = tmp_path / "dst"
    names = tmp_path / "names.txt"
    for text, msg in [
        ("run\n", f"class folders eat, jump, sit and 1 more of {src} are not in --classes {names} "
                  "(1 names): add them to the list, or move them out of the source folder (nothing "
                  "was written)"),
        ("run\njump\nsit\nwalk\n", f"class folder eat of {src} is not in --classes {names} (4 names)"),
        ("run\njump\nrun\n", f"--classes {names} lists the class 'run' twice (names 1 and 3): list "
                             "each class once"),
        ("\n\n", f"--classes {names} lists no class names"),
    ]:
        names.write_text(text)
        for shards in ([], ["--shards"]):
            assert main(["prepare", str(src), str(dst), "--classes", str(names), *shards]) == 2
            assert msg in _one_line_error(capsys)
            assert not dst.exists()
    assert main(["prepare", str(src), str(dst), "--classes", str(tmp_path / "nope.txt")]) == 2
    assert _one_line_error(capsys) == f"--classes file not found: {tmp_path / 'nope.txt'}"
    names.write_bytes(b"caf\xe9\n")
    assert main(["prepare", str(src), str(dst), "--classes", str(names)]) == 2
    assert "is not UTF-8 text" in _one_line_error(capsys)
    with pytest.raises(ValueError, match="the class list holds ' run', not a class name"):
        prepare_videos(src, dst, classes=[" run", "jump"], progress=False)
    flat = _small_tree(tmp_path / "flat", ["v.mp4", "k/w.mp4"])  # --classes would be ignored
    names.write_text("k\n")
    assert main(["prepare", str(flat), str(dst), "--classes", str(names)]) == 2
    assert _one_line_error(capsys) == (
        f"--classes numbers class folders (SRC/<class>/<video>), and 1 videos are not in one (e.g. "
        f"{flat / 'v.mp4'}): move them into class folders, or leave out --classes")
    assert not dst.exists()


# ------------------------------------------------------------------------------ settings record
def test_a_rerun_with_other_settings_is_refused(tmp_path, capsys):
    src = _small_tree(tmp_path, ["a/x.mp4", "b/y.mp4"])
    dst = tmp_path / "dst"
    run = ["prepare", str(src), str(dst), "--short-side", "16", "--fps", "6", "--no-progress"]
    assert main(run) == 0
    record = json.loads((dst / "prepare.json").read_text())
    assert record["settings"] == {"short_side": 16, "fps": 6.0, "crf": 23}
    capsys.readouterr()
    stamps = {p: p.stat().st_mtime_ns for p in dst.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    names = tmp_path / "names.txt"
    names.write_text("b\na\nc\n")
    fix = (": run with the settings they were made with to resume, or choose another destination "
           f"(or empty {dst})")
    for args, changes in [
        (["--short-side", "32", "--fps", "6", "--crf", "30"], "short_side 16 -> 32; crf 23 -> 30"),
        (["--short-side", "16", "--fps", "12"], "fps 6.0 -> 12.0"),
        (["--short-side", "16"], "fps 6.0 -> source rate"),
    ]:
        assert main(["prepare", str(src), str(dst), *args, "--no-progress"]) == 2
        assert _one_line_error(capsys) == (f"the videos in {dst} were prepared with other settings "
                                           f"({changes}){fix}")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten, the record neither
    assert not _hidden(dst)
    # the same settings resume; --workers and the progress bar are not settings; fps=6 is --fps 6
    assert main([*run, "--workers", "2"]) == 0
    assert "prepared 0 videos, 2 already done" in capsys.readouterr().out
    assert prepare_videos(src, dst, short_side=16, fps=6, progress=False)["existing"] == 2

    # another --classes renumbers the lists, which every run rewrites, and re-encodes nothing
    videos = {p: p.stat().st_mtime_ns for p in dst.rglob("*.mp4")}
    assert main([*run, "--classes", str(names)]) == 0
    assert (dst / "classes.txt").read_text() == "b\na\nc\n"
    assert sorted(read_annotations(dst / "annotations.txt")) == [("a/x.mp4", 1), ("b/y.mp4", 0)]
    assert {p: p.stat().st_mtime_ns for p in videos} == videos


def test_a_destination_without_a_record_is_accepted_with_a_note(tmp_path, capsys):
    src = _small_tree(tmp_path, ["a/x.mp4"])
    dst = tmp_path / "dst"
    assert not prepare_videos(src, dst, short_side=16, progress=False)["unchecked"]
    (dst / "prepare.json").unlink()  # as an older zeroi2v left it
    assert main(["prepare", str(src), str(dst), "--short-side", "32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"note: {dst} holds videos of an older zeroi2v that did not record its "
                          "settings, so they cannot be checked against this command's; they are "
                          f"kept, and this command's settings are recorded in {dst / 'prepare.json'}\n")
    assert "0 videos, 1 already done" in out
    assert json.loads((dst / "prepare.json").read_text())["settings"]["short_side"] == 32
    (dst / "prepare.json").write_text("{")
    assert main(["prepare", str(src), str(dst), "--short-side", "32", "--no-progress"]) == 2
    assert _one_line_error(capsys).startswith(f"{dst / 'prepare.json'} is not valid JSON: ")
    (dst / "prepare.json").write_text('{"format": "something else", "settings": {}}')
    with pytest.raises(ValueError, match="is not the settings record of zeroi2v prepare: remove it if"):
        prepare_videos(src, dst, short_side=32, progress=False)


def test_progress_written_to_a_file_is_lines_not_terminal_frames(tree, tmp_path):
    """Under nohup or Slurm the progress of prepare is plain lines, as training's is."""
    src, _ = tree
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "zeroi2v.cli", "prepare", str(src),
                            str(tmp_path / "dst"), "--short-side", "16"], stdout=f,
                           stderr=subprocess.STDOUT, timeout=300,
                           env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    text = log.read_text()
    assert r.returncode == 0, text[-500:]
    assert "\r" not in text and "\x1b[" not in text
    assert any(ln.startswith("prepare: ") and "/5 (" in ln for ln in text.splitlines()), text


def test_videos_scaled_up_are_counted_and_said(tmp_path, capsys):
    src = _small_tree(tmp_path, ["a/x.mp4", "b/y.mp4"])  # 32 x 32 clips
    assert main(["prepare", str(src), str(tmp_path / "up"), "--short-side", "48",
                 "--no-progress"]) == 0
    assert "note: 2 of the 2 videos converted were smaller than --short-side" in \
        capsys.readouterr().out
    assert prepare_videos(src, tmp_path / "down", short_side=16, progress=False)["upscaled"] == 0


def test_values_no_encoder_takes_are_refused_before_the_destination(tmp_path, capsys):
    src = _small_tree(tmp_path, ["a/x.mp4"])
    dst = tmp_path / "dst"
    for args, msg in [(["--fps", "inf"], "--fps must be from 0.1 to 1000"),
                      (["--fps", "1e-300"], "--fps must be from 0.1 to 1000"),
                      (["--crf", "-5"], "--crf must be from 0 to 51"),
                      (["--short-side", "100000"], "--short-side must be an even number from 2")]:
        assert main(["prepare", str(src), str(dst), *args, "--no-progress"]) == 2
        assert msg in _one_line_error(capsys)
        assert not dst.exists()
    # a record with nothing made under it holds nothing back; many workers start few processes
    dst.mkdir()
    (dst / "prepare.json").write_text(json.dumps({"format": "zeroi2v-prepare", "version": 1,
                                                  "settings": {"short_side": 64}}))
    assert main(["prepare", str(src), str(dst), "--short-side", "16", "--workers", "100000",
                 "--no-progress"]) == 0
    assert json.loads((dst / "prepare.json").read_text())["settings"]["short_side"] == 16


def test_nothing_readable_is_an_error_and_a_device_as_record_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "bad.mp4").write_bytes(b"not a video")
    assert main(["prepare", str(src), str(tmp_path / "d1"), "--short-side", "16",
                 "--no-progress"]) == 2
    assert "none of the 1 videos could be read" in capsys.readouterr().err
    src = _small_tree(tmp_path, ["a/x.mp4"])
    dst = tmp_path / "d2"
    dst.mkdir()
    os.symlink("/dev/zero", dst / "prepare.json")
    assert main(["prepare", str(src), str(dst), "--short-side", "16", "--no-progress"]) == 2
    assert "prepare.json is a device or socket" in _one_line_error(capsys)
