"""Two runs never mix, a killed run leaves nothing behind that misleads the next, and damaged
files are found before they are used (issue #21)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _helpers import cfg_dict, synthetic_videos, write
from zeroi2v.cli import main
from zeroi2v.safe_io import LOCK_FILE, atomic_write_text, folder_lock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_videos(tmp_path_factory)


def _holder(folder: Path, command: str = "zeroi2v train other.yaml") -> subprocess.Popen:
    """Another process holding ``folder``'s lock until killed."""
    code = ("import sys, time\nfrom zeroi2v.safe_io import folder_lock\n"
            f"with folder_lock({str(folder)!r}, {command!r}):\n"
            "    print('locked', flush=True)\n    time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_into_a_locked_folder_is_refused_then_a_dead_lock_is_taken_over(
        tmp_path, data, capsys):
    out = tmp_path / "run"
    cfg = write(tmp_path / "c.yaml", cfg_dict(data, train={"epochs": 1}))
    holder = _holder(out)
    try:
        assert main(["train", cfg, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {holder.pid}" in err[0] \
            and "`zeroi2v train other.yaml`" in err[0] and "is in use by another zeroi2v run" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", cfg, "--out", str(out)]) == 0  # the dead process's lock is taken over
    printed = capsys.readouterr().out
    assert f"locked by pid {holder.pid}" in printed and "taken over" in printed
    assert (out / LOCK_FILE).read_text() == ""  # released at the end


def test_two_train_commands_started_together_never_mix(tmp_path, data):
    out = tmp_path / "run"
    cfgs = [write(tmp_path / f"c{i}.yaml", cfg_dict(data, train={"epochs": 2, "lr": lr}))
            for i, lr in enumerate((1e-3, 5e-3))]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-m", "zeroi2v.cli", "train", c, "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for c in cfgs]
    results = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, [r[1][-400:] for r in results])
    loser = [ln for ln in results[codes.index(2)][1].splitlines() if "error" in ln]
    assert len(loser) == 1 and ("in use by another zeroi2v run" in loser[0]
                                or "holds a previous run" in loser[0]), loser
    winner_lr = (1e-3, 5e-3)[codes.index(0)]
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    setups = [r for r in recs if r["type"] == "setup"]
    assert len(setups) == 1 and setups[0]["lr"] == pytest.approx(winner_lr)
    assert f"lr: {winner_lr}" in (out / "config.yaml").read_text()


def test_leftovers_of_a_killed_run_are_removed_at_the_next_start(tmp_path, data, capsys):
    out = tmp_path / "run"
    cfg = write(tmp_path / "c.yaml", cfg_dict(data, train={"epochs": 1}))
    (out / "checkpoints" / ".epoch_0001.x1y2.tmp").mkdir(parents=True)
    (out / "checkpoints" / ".epoch_0001.x1y2.tmp" / "model.safetensors").write_bytes(b"half")
    (out / ".last.1234.tmp").write_text("half")
    assert main(["train", cfg, "--out", str(out)]) == 0
    assert "removed 2 half-written file(s)" in capsys.readouterr().out
    assert not list(out.rglob("*.tmp"))


def test_a_damaged_last_checkpoint_names_the_newest_intact_one(tmp_path, data, capsys):
    out = tmp_path / "run"
    cfg = write(tmp_path / "c.yaml", cfg_dict(data, train={"epochs": 3}))
    assert main(["train", cfg, "--out", str(out), "--set", "train.stop_after_epoch=2"]) == 0
    last = (out / "last").resolve()
    assert last.name == "epoch_0002" and (out / "checkpoints" / "epoch_0001").is_dir()
    w = last / "model.safetensors"
    data_ = bytearray(w.read_bytes())
    data_[-3] ^= 0x10
    w.write_bytes(bytes(data_))
    capsys.readouterr()
    assert main(["train", cfg, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epoch_0002/model.safetensors is damaged" in err[0]
    assert f"the newest intact checkpoint is {out / 'checkpoints' / 'epoch_0001'}" in err[0]
    # following the advice continues the run
    assert main(["train", cfg, "--out", str(out), "--resume",
                 str(out / "checkpoints" / "epoch_0001")]) == 0
    # a damaged training state is found the same way
    state = (out / "last").resolve() / "training_state.pt"
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    state.write_bytes(bytes(raw))
    assert main(["train", cfg, "--out", str(out), "--resume"]) == 2
    assert "training_state.pt is damaged" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_follow_the_umask(tmp_path, umask):
    from zeroi2v import create_video_model

    old = os.umask(umask)
    try:
        create_video_model("vit_small_patch16_224", 2, 3, img_size=32, depth=1,
                           head_offsets="spatial").save_pretrained(tmp_path / "m")
        atomic_write_text(tmp_path / "t.txt", "x")
    finally:
        os.umask(old)
    for p in (tmp_path / "m" / "model.safetensors", tmp_path / "m" / "config.json",
              tmp_path / "t.txt"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_checkpoint_folder_follows_the_umask(tmp_path):
    from zeroi2v import create_video_model
    from zeroi2v.train.checkpoint import save_checkpoint

    old = os.umask(0o002)
    try:
        m = create_video_model("vit_small_patch16_224", 2, 3, img_size=32, depth=1,
                               head_offsets="spatial")
        folder = save_checkpoint(tmp_path, m, epoch=1, run_config={}, state={"step": 0})
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o775
    assert all(p.stat().st_mode & 0o777 == 0o664 for p in folder.iterdir())


def test_the_lock_is_per_folder_and_released(tmp_path):
    with folder_lock(tmp_path / "a", "one"):
        with folder_lock(tmp_path / "b", "two"):  # another folder: no conflict
            pass
        with pytest.raises(ValueError, match="in use by another zeroi2v run"):
            with folder_lock(tmp_path / "a", "three"):
                pass
    t0 = time.perf_counter()
    with folder_lock(tmp_path / "a", "four") as stale:
        assert stale is None  # released cleanly: nothing to report
    assert time.perf_counter() - t0 < 1


def test_an_official_checkpoint_with_a_stray_block_key_is_refused_at_once(tmp_path, capsys):
    from official_ckpt import make_official

    sd = make_official(64, 2, 4, 7)
    sd["backbone.transformer.resblocks.99999.ln_1.weight"] = torch.ones(64)
    p = tmp_path / "stray.pth"
    torch.save({"state_dict": sd}, p)
    t0 = time.perf_counter()
    assert main(["import-official", str(p), "--out", str(tmp_path / "o"),
                 "--head-offsets", "1,-1,0,0"]) == 2
    err = capsys.readouterr().err
    assert "resblocks.99999.ln_1.weight" in err and "99,997 blocks between are missing" in err
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- full disks


def _tmpfs(path: Path, size: str) -> bool:
    """A small tmpfs at ``path`` where this machine allows mounting (root in a VM); else False
    and the caller simulates the full disk."""
    path.mkdir()
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def _unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def _simulate_full_disk(monkeypatch):
    """What a full disk looks like to zeroi2v: torch.save's RuntimeError and no free blocks."""
    import zeroi2v.safe_io as files

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(files.torch, "save", full)
    real = os.statvfs
    monkeypatch.setattr(files.os, "statvfs", lambda p: os.statvfs_result(
        tuple(0 if i in (3, 4) else v for i, v in enumerate(real(p)))))


@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])
def test_a_full_disk_while_saving_a_model_is_one_line(tmp_path, capsys, monkeypatch, disk):
    from zeroi2v import create_video_model

    small = tmp_path / "small"
    mounted = _tmpfs(small, "1m") if disk == "tmpfs" else (small.mkdir() or False)
    if disk == "tmpfs" and not mounted:
        pytest.skip("mounting a 1 MB tmpfs needs root on a machine that allows mounts; the "
                    "simulated case covers the same path")
    try:
        m = create_video_model("vit_small_patch16_224", 2, 3, img_size=32, depth=2,
                               head_offsets="spatial")
        m.save_pretrained(tmp_path / "m")
        if not mounted:
            _simulate_full_disk(monkeypatch)
            import zeroi2v.models.artefact as artefact

            def full_st(*a, **k):
                raise RuntimeError("Error while serializing: I/O error: No space left on "
                                   "device (os error 28)")
            monkeypatch.setattr("safetensors.torch.save_file", full_st)
            assert artefact  # the module that calls save_file
        capsys.readouterr()
        assert main(["merge", str(tmp_path / "m"), "--out", str(small / "merged")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "No space left on device" in err[0] and "intact" in err[0]
        assert not (small / "merged").exists() and not list(small.glob(".*"))
    finally:
        if mounted:
            _unmount(small)


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one(tmp_path, data, capsys, monkeypatch):
    import zeroi2v.train.checkpoint as ckpt
    from zeroi2v.train.checkpoint import verify_checkpoint

    out = tmp_path / "run"
    cfg = write(tmp_path / "c.yaml", cfg_dict(data, train={"epochs": 2}))
    real = ckpt.save_checkpoint

    def second_fails(out_dir, model, *, epoch, **kw):
        if epoch == 2:
            _simulate_full_disk(monkeypatch)
        return real(out_dir, model, epoch=epoch, **kw)

    monkeypatch.setattr("zeroi2v.train.engine.save_checkpoint", second_fails)
    assert main(["train", cfg, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device while saving the checkpoint of epoch 2" \
        in err[0] and "epoch_0001 is intact" in err[0], err
    assert (out / "last").resolve().name == "epoch_0001"
    assert verify_checkpoint(out / "last") is None
    assert not list(out.rglob("*.tmp"))


# ----------------------------------------------------------------------------- --out


def test_out_never_replaces_a_model_file_nor_an_existing_file(tmp_path, capsys):
    from zeroi2v import create_video_model

    create_video_model("vit_small_patch16_224", 2, 3, img_size=32, depth=1,
                       head_offsets="spatial").save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    for argv in (["eval", str(tmp_path / "m"), "--ann", "a.txt", "--out",
                  str(tmp_path / "m" / "config.json"), "--overwrite"],
                 ["export", str(tmp_path / "m"), "--out", str(tmp_path / "m" / "model.safetensors"),
                  "--format", "pt2", "--overwrite"]):
        assert main(argv) == 2
        assert "is a file of the saved model" in capsys.readouterr().err
    (tmp_path / "old.json").write_text("{}")
    (tmp_path / "old_confusion.png").write_text("keep")
    assert main(["eval", str(tmp_path / "m"), "--ann", "a.txt", "--out",
                 str(tmp_path / "old.json")]) == 2
    assert "old.json exists: choose another name or pass --overwrite" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "m"), "--ann", "a.txt", "--out",
                 str(tmp_path / "old_x.json")]) == 2  # its annotation file is missing
    assert "a.txt" in capsys.readouterr().err
    (tmp_path / "x.pt2").write_text("keep")
    assert main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "x.pt2")]) == 2
    assert "x.pt2 exists" in capsys.readouterr().err
    assert (tmp_path / "x.pt2").read_text() == "keep"
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
