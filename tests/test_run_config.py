"""A run's settings cannot drift (issue #22): the typed config reaches what it controls, resume
continues the run it names and refuses silent changes, and the logs read well anywhere."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import cfg_dict, synthetic_videos, write
from zeroi2v.cli import main
from zeroi2v.train.config import RESUME_SAFE, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_videos(tmp_path_factory)


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


# ----------------------------------------------------------------------------- eval.short_side


def test_eval_short_side_reaches_the_test_transform(data):
    from zeroi2v.train.build import build_test_dataset

    for side, want in ((None, 16), (24, 24), (64, 64)):  # null: the crop size, no margin
        cfg = load_config(None, base=cfg_dict(data, eval={"short_side": side}))
        ds = build_test_dataset(cfg, data["val"])
        assert ds.transform.test_short_side == want
        assert ds[0][0].shape[-2:] == (16, 16)  # the crop is data.size whatever the resize


def test_eval_short_side_below_the_crop_is_refused(data, capsys):
    assert main(["config", "--set", "eval.short_side=10"]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "eval.short_side is 10, smaller than the 224-pixel crop" in err[0]


# ----------------------------------------------------------------------------- resume


def _run(tmp_path, data, epochs=2, **sections):
    sections["train"] = {"epochs": epochs, **sections.get("train", {})}
    return write(tmp_path / "c.yaml", cfg_dict(data, **sections))


@pytest.mark.parametrize("change,keys", [
    (["--set", "train.lr=0.5", "--set", "train.batch_size=3"],
     ["train.lr: 0.001 -> 0.5", "train.batch_size: 2 -> 3"]),
    (["--set", "train.seed=7"], ["train.seed: 0 -> 7"]),
    (["--set", "data.train_ann=OTHER"], ["data.train_ann:"]),
])
def test_resume_refuses_changed_settings_naming_each(tmp_path, data, capsys, change, keys):
    cfg = _run(tmp_path, data, epochs=3)
    out = str(tmp_path / "r")
    assert main(["train", cfg, "--out", out, "--set", "train.stop_after_epoch=1"]) == 0
    change = [c.replace("OTHER", data["val"]) for c in change]
    capsys.readouterr()
    assert main(["train", cfg, "--out", out, "--resume", *change]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "settings differ from it" in err[0], err
    for k in keys:
        assert k in err[0], (k, err[0])
    assert (Path(out) / "last").resolve().name == "epoch_0001"  # nothing trained on


def test_resume_accepts_a_longer_run_and_says_so(tmp_path, data, capsys):
    cfg = _run(tmp_path, data, epochs=2)
    out = tmp_path / "r"
    assert main(["train", cfg, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--set", "train.epochs=3"]) == 0
    printed = capsys.readouterr().out
    assert "resuming with changed settings: train.epochs 2 -> 3" in printed
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs if r["type"] == "epoch"] == [1, 2, 3]
    assert any(r["type"] == "resume_changes" and r["changes"][0]["key"] == "train.epochs"
               for r in recs)
    assert "epochs: 3" in (out / "config.yaml").read_text()


def _lrs(out: Path, epoch: int) -> list[float]:
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [r["lr"] for r in recs if r["type"] == "train" and r["epoch"] == epoch]


def test_a_longer_run_on_resume_stretches_the_schedule_to_its_new_end(tmp_path, data, capsys):
    """2 epochs, then resumed to 3: the third epoch has the learning rates of a run planned for
    3 epochs from the start, not the floor the 2-epoch cosine had reached."""
    cfg = _run(tmp_path, data, epochs=2)
    short, straight = tmp_path / "short", tmp_path / "straight"
    assert main(["train", cfg, "--out", str(short)]) == 0
    assert main(["train", cfg, "--out", str(straight), "--set", "train.epochs=3"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(short), "--set", "train.epochs=3"]) == 0
    printed = capsys.readouterr().out
    assert "learning-rate schedule: now ends at step" in printed
    want = _lrs(straight, 3)
    assert want and want[0] > 0  # (the last step sets the end of the cosine, 0)
    assert _lrs(short, 3) == pytest.approx(want, rel=1e-6)
    recs = [json.loads(x) for x in (short / "log.jsonl").read_text().splitlines()]
    change = [r for r in recs if r["type"] == "schedule_change"]
    assert len(change) == 1 and change[0]["total_steps"] * 2 == change[0]["was"] * 3


def test_resume_to_fewer_epochs_than_done_is_refused_and_a_finished_run_says_so(tmp_path, data,
                                                                                capsys):
    cfg = _run(tmp_path, data, epochs=3)
    out = tmp_path / "r"
    assert main(["train", cfg, "--out", str(out), "--set", "train.stop_after_epoch=2"]) == 0
    log = (out / "log.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--set", "train.epochs=1"]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "train.epochs is 1, but" in err[0] and "finished 2 epochs" in err[0]
    assert (out / "log.jsonl").read_text() == log and "epochs: 3" in (out / "config.yaml").read_text()
    # the saved stop was reached: the resume goes on to the end, and says so
    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert "train.stop_after_epoch 2 was reached before this resume" in capsys.readouterr().out
    assert (out / "last").resolve().name == "epoch_0003"
    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert "the run has finished its 3 epochs, nothing to train" in capsys.readouterr().out


def test_resume_of_a_checkpoint_continues_in_its_own_run_folder(tmp_path, data, capsys):
    """A checkpoint given without --out continues in the folder of the run that saved it, even
    after that folder moved and another run took its old place; resuming into a folder that
    holds another run's checkpoints is refused."""
    cfg = _run(tmp_path, data, epochs=2)
    a, moved = tmp_path / "a", tmp_path / "moved"
    assert main(["train", cfg, "--out", str(a), "--set", "train.stop_after_epoch=1"]) == 0
    a.rename(moved)
    assert main(["train", cfg, "--out", str(a), "--set", "train.stop_after_epoch=1"]) == 0
    log_a = (a / "log.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(moved / "last")]) == 0
    assert "train.out_dir" in capsys.readouterr().out  # it moved: said
    assert (moved / "last").resolve().name == "epoch_0002"
    assert (a / "last").resolve().name == "epoch_0001" and (a / "log.jsonl").read_text() == log_a
    assert main(["train", "--resume", str(moved / "checkpoints" / "epoch_0001"),
                 "--out", str(a)]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "holds another run's checkpoints" in err[0], err
    assert f"--out {moved.resolve()}" in err[0]
    assert (a / "log.jsonl").read_text() == log_a
    # a checkpoint of a run that stayed where it was: no change of out_dir to report
    assert main(["train", "--resume", str(a / "last"), "--set", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "train.out_dir" not in out and "train.epochs 2 -> 3" in out


def test_a_run_copied_without_its_links_resumes(tmp_path, data):
    """cp -rL / rsync -L turn last and best into folders: still the run's own checkpoints."""
    import shutil

    cfg = _run(tmp_path, data, epochs=2)
    assert main(["train", cfg, "--out", str(tmp_path / "a"), "--set",
                 "train.stop_after_epoch=1"]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "a", copy)  # follows the links, as cp -rL does
    assert (copy / "last").is_dir() and not (copy / "last").is_symlink()
    assert main(["train", "--resume", "--out", str(copy)]) == 0
    assert (copy / "last").is_symlink() and (copy / "last").resolve().name == "epoch_0002"
    assert (tmp_path / "a" / "last").resolve().name == "epoch_0001"


def test_a_run_continued_in_a_new_folder_says_where_its_best_is(tmp_path, data, capsys):
    cfg = _run(tmp_path, data, epochs=3)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", cfg, "--out", str(a), "--set", "train.stop_after_epoch=2"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(a / "checkpoints" / "epoch_0002"), "--out", str(b)]) == 0
    best = (a / "best").resolve().name[len("epoch_"):].lstrip("0")
    assert f"the best checkpoint so far (epoch {best}) stays in {a.resolve() / 'best'}" in \
        capsys.readouterr().out
    assert (b / "best").resolve().name == "epoch_0003"  # this folder's own best
    assert main(["train", "--resume", str(a / "checkpoints" / "epoch_0009"), "--out",
                 str(tmp_path / "c")]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "checkpoint not found" in err[0] and "keeps epoch_0001, epoch_0002" in err[0]


def test_zeroi2v_alone_prints_what_it_can_do(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: zeroi2v") and "train" in err and "prepare" in err


def test_resume_needs_nothing_but_the_folder_and_reads_a_yaml_given_after_it(tmp_path, data,
                                                                             capsys):
    cfg = _run(tmp_path, data, epochs=2)
    out = tmp_path / "r"
    assert main(["train", cfg, "--out", str(out), "--set", "train.stop_after_epoch=1"]) == 0
    # `train --resume my.yaml` is the config, not a checkpoint path
    assert main(["train", "--resume", cfg, "--out", str(out)]) == 0
    assert (out / "last").resolve().name == "epoch_0002"
    assert main(["train", "--resume"]) == 2
    assert "needs the run's folder: zeroi2v train --resume --out DIR" in _err(capsys)[-1]


def test_resume_safe_keys_do_not_change_the_numbers():
    """What RESUME_SAFE admits is only how long, where and how visibly a run goes on."""
    assert RESUME_SAFE <= {"train.epochs", "train.stop_after_epoch", "train.progress",
                           "train.log_interval", "train.tensorboard", "train.out_dir",
                           "data.num_workers", "data.pin_memory", "data.root", "data.val_root",
                           "eval.batch_size"}


# ----------------------------------------------------------------------------- logs


def test_no_progress_still_prints_one_line_per_epoch(tmp_path, data, capsys):
    cfg = _run(tmp_path, data, epochs=2)
    assert main(["train", cfg, "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2: loss ")
    assert " lr " in lines[0] and " s" in lines[0] and "val top1" in lines[1]


def test_a_log_written_to_a_file_has_no_progress_frames(tmp_path, data):
    cfg = write(tmp_path / "c.yaml", cfg_dict(data, train={"epochs": 2, "progress": True,
                                                            "log_interval": 1}))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "zeroi2v.cli", "train", cfg, "--out",
                        str(tmp_path / "r")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-500:]
    both = r.stdout + r.stderr
    assert "\r" not in both and "\x1b[" not in both
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("epoch 2/2: loss")]
    assert any(ln.startswith("epoch 1/2: ") and "/" in ln and "loss" in ln
               for ln in r.stdout.splitlines() if not ln.startswith("epoch 1/2: loss"))


def test_a_stray_line_in_the_log_costs_no_epoch(tmp_path, data):
    cfg = _run(tmp_path, data, epochs=2)
    out = tmp_path / "r"
    assert main(["train", cfg, "--out", str(out), "--set", "train.stop_after_epoch=1"]) == 0
    with open(out / "log.jsonl", "a") as f:
        f.write('{"type": "epoch"}\n[1, 2]\n{"type": "train", "step": "x"}\n')
    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert (out / "last").resolve().name == "epoch_0002" and (out / "curves.png").is_file()


def test_durations_read_as_people_write_them():
    from zeroi2v.progress import seconds

    assert [seconds(x) for x in (0.04, 0.42, 9.96, 12.3, 59.6, 185, 7620)] == [
        "0.0 s", "0.4 s", "10 s", "12 s", "1 min 00 s", "3 min 05 s", "2 h 07 min"]


def test_tables_in_a_file_are_not_wrapped_at_80_columns(tmp_path):
    """The demo's table under nohup/Slurm: one row per line, not cells broken over lines."""
    out = tmp_path / "out.txt"
    code = ("from zeroi2v.train.demo import print_demo_table\n"
            "m = dict(head_offsets=[1, -1, 0, 0], top1=90.0, mean_class_acc=90.0, params=10,"
            " clips_per_s=1.0, file='x/model.safetensors')\n"
            "print_demo_table(dict(settings=dict(classes=list('abcd'), train_backbone=False,"
            " epochs=1, threads=1), image_only=m, stdha=m, stdha_merged=m,"
            " plain_vit=dict(m, params_no_head=9), merged_vs_unmerged_max_rel_err=0.0,"
            " wall_time_s=1.0, data_time_s=0.1))\n")
    with open(out, "w") as f:
        subprocess.run([sys.executable, "-c", code], stdout=f, check=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    rows = [ln for ln in out.read_text().splitlines() if "STDHA merged (deployed)" in ln]
    assert len(rows) == 1 and "90.0" in rows[0]


def test_curves_and_tensorboard(tmp_path, data):
    pytest.importorskip("tensorboard", reason="train.tensorboard needs the tensorboard package: "
                                              "pip install 'zeroi2v[tensorboard]'")
    cfg = _run(tmp_path, data, epochs=2, train={"tensorboard": True})
    out = tmp_path / "r"
    assert main(["train", cfg, "--out", str(out)]) == 0
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_version(capsys):
    from zeroi2v import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and f"zeroi2v {__version__}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- start-up


def test_a_wrong_root_fails_before_anything_is_written(tmp_path, data, capsys):
    cfg = write(tmp_path / "c.yaml", cfg_dict(data))
    out = tmp_path / "r"
    assert main(["train", cfg, "--out", str(out), "--set", f"data.root={tmp_path}/nowhere"]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "none of the" in err[0] and "is the root right?" in err[0]
    assert not out.exists()


def test_a_label_out_of_range_names_file_and_line(tmp_path, data, capsys):
    ann = tmp_path / "a.txt"
    lines = Path(data["train"]).read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + " 7"
    ann.write_text("\n".join(lines) + "\n")
    cfg = write(tmp_path / "c.yaml", cfg_dict(data, data={"train_ann": str(ann)},
                                              model={"num_classes": 2}))
    assert main(["train", cfg, "--out", str(tmp_path / "r")]) == 2
    err = _err(capsys)
    assert len(err) == 1 and f"{ann} line 3 has label 7" in err[0]


def test_a_failed_start_leaves_the_folder_reusable(tmp_path, data, capsys, monkeypatch):
    import zeroi2v.train.engine as engine

    cfg = _run(tmp_path, data, epochs=1)
    out = tmp_path / "r"

    def boom(run, epoch):
        raise ValueError("simulated failure in the first epoch")

    monkeypatch.setattr(engine, "train_one_epoch", boom)
    assert main(["train", cfg, "--out", str(out)]) == 2
    assert (out / "log.jsonl").exists()
    monkeypatch.undo()
    assert main(["train", cfg, "--out", str(out)]) == 0  # no --overwrite needed
    assert "ended before its first checkpoint" in capsys.readouterr().out


def test_workers_default_to_the_machine_and_aliases_suggest_the_key(capsys):
    from zeroi2v.train.config import default_num_workers

    cfg = load_config()
    assert cfg.data.num_workers == default_num_workers() <= min(4, os.cpu_count() or 1)
    assert main(["config", "--set", "train.learning_rate=1"]) == 2
    assert "did you mean 'train.lr'?" in _err(capsys)[0]
    assert main(["config", "--set", "model.frames=4"]) == 2
    assert "did you mean 'model.num_frames'?" in _err(capsys)[0]


def test_a_folder_named_checkpoints_is_no_run_and_copies_beside_checkpoints_stay(tmp_path, data,
                                                                                 capsys):
    import shutil

    cfg = _run(tmp_path, data, epochs=3)
    run = tmp_path / "run"
    assert main(["train", cfg, "--out", str(run), "--set", "train.stop_after_epoch=1"]) == 0
    store = tmp_path / "store" / "checkpoints"
    store.mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "epoch_0001", store / "epoch_0001")
    capsys.readouterr()
    assert main(["train", "--resume", str(store / "epoch_0001")]) == 2
    assert "is not inside a run's checkpoints folder" in _err(capsys)[0]
    assert not (tmp_path / "store" / "log.jsonl").exists()
    keep = run / "checkpoints" / "epoch_0001_keep"  # the user's own copy
    shutil.copytree(run / "checkpoints" / "epoch_0001", keep)
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert keep.is_dir()


def test_an_unknown_option_is_named_by_its_command(capsys):
    assert main(["eval", "somewhere", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zeroi2v eval: error: unrecognized arguments: --bogus") and \
        err.count("\n") == 1
