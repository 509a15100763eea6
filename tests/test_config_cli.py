"""A command line and config that never mislead (issue #15): strict configs, one-line errors,
stated settings, deterministic runs, safe output folders."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _helpers import cfg_dict, synthetic_videos, write
from zeroi2v.cli import main
from zeroi2v.train.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_videos(tmp_path_factory, videos_per_class=6, val_fraction=0.34)


def err_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error message"
    return err[-1]


# ----------------------------------------------------------------------------- strict config


@pytest.mark.parametrize("section,key,value,msg", [
    ("train", "epoch", 2, r"unknown key 'train\.epoch'.*did you mean 'train\.epochs'"),
    ("model", "head_offset", [1, -1, 0, 0], r"did you mean 'model\.head_offsets'"),
    ("train", "lr", "fast", r"train\.lr: .*valid number.*'fast'"),
    ("train", "batch_size", 2.5, r"train\.batch_size: .*fractional part.*2\.5"),
    ("model", "num_frames", -4, r"model\.num_frames: .*greater than or equal to 1"),
    ("data", "sampling", "dens", r"data\.sampling: must be 'dense' or 'uniform'"),
    ("eval", "num_crops", 2, r"eval\.num_crops: must be 1 or 3"),
    ("train", "amp", "fast", r"train\.amp: must be"),
    ("data", "flip_label_map", {"left": "right"}, r"data\.flip_label_map"),
])
def test_bad_keys_and_types_in_the_file_name_the_key(tmp_path, data, capsys, section, key, value,
                                                    msg):
    cfg = cfg_dict(data)
    cfg[section][key] = value
    path = write(tmp_path / "c.yaml", cfg)
    assert main(["train", path, "--out", str(tmp_path / "run")]) == 2
    line = err_line(capsys)
    assert line.startswith("zeroi2v train: error: ") and str(tmp_path / "c.yaml") in line
    import re
    assert re.search(msg, line), line
    assert not (tmp_path / "run").exists()  # refused before any work
    # the same through --set
    cfg = cfg_dict(data)
    path = write(tmp_path / "ok.yaml", cfg)
    text = json.dumps(value) if not isinstance(value, str) else value
    assert main(["config", path, "--set", f"{section}.{key}={text}"]) == 2
    assert re.search(msg, err_line(capsys))


def test_broken_yaml_and_unknown_section(tmp_path, capsys):
    (tmp_path / "b.yaml").write_text("train:\n  epochs: [2\n")
    assert main(["config", str(tmp_path / "b.yaml")]) == 2
    assert "not valid YAML (line" in err_line(capsys)
    (tmp_path / "s.yaml").write_text("trian: {epochs: 2}\n")
    assert main(["config", str(tmp_path / "s.yaml")]) == 2
    assert "did you mean 'train'" in err_line(capsys)


@pytest.mark.parametrize("change,msg", [
    ({"data": {"size": 32}}, r"data\.size is 32 but vit_base_patch16_224 takes 16x16"),
    ({"model": {"head_offsets": [4, -1, 0, 0]}}, r"head_offsets.*\[4\].*4 frames"),
    ({"model": {"head_offsets": [1, -1]}}, r"2 head offsets for 4 attention heads"),
    ({"model": {"name": "vit_nonexistent_patch16"}}, r"unknown timm model"),
    ({"model": {"pretrained": "/no/such/file.pth"}}, r"model\.pretrained: .*not found"),
    ({"data": {"train_ann": "/no/such/ann.txt"}}, r"data\.train_ann: annotation file not found"),
])
def test_cross_field_mismatches_before_any_work(tmp_path, data, capsys, change, msg):
    cfg = cfg_dict(data, **change)
    assert main(["train", write(tmp_path / "c.yaml", cfg), "--out", str(tmp_path / "r")]) == 2
    import re
    assert re.search(msg, err_line(capsys))
    assert not (tmp_path / "r").exists()


def test_class_names_file_must_fit(tmp_path, data, capsys):
    names = tmp_path / "names.txt"  # the data's classes and one more, for a 2-class model
    names.write_text("\n".join(data["classes"] + ["c"]) + "\n")
    cfg = cfg_dict(data, data={"class_names": str(names)}, model={"num_classes": 2})
    assert main(["train", write(tmp_path / "c.yaml", cfg), "--out", str(tmp_path / "r")]) == 2
    assert "names 3 classes, the model and data have 2" in err_line(capsys)


# ----------------------------------------------------------------------------- one error path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("run")
    cfg = cfg_dict(data, train={"epochs": 1})
    assert main(["train", write(d / "c.yaml", cfg), "--out", str(d / "run")]) == 0
    return d


def test_each_command_on_a_corrupt_video_is_one_line(tmp_path, trained, data, capsys):
    model = str(trained / "run" / "last")
    bad = {"empty.mp4": b"", "text.mp4": b"not a video at all\n", "trunc.mp4": None}
    good = Path(data["root"]) / open(data["val"]).readline().split()[0]
    bad["trunc.mp4"] = good.read_bytes()[:300]
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        assert main(["predict", model, str(tmp_path / name)]) == 2
        line = capsys.readouterr().err.strip().splitlines()
        assert len(line) == 2 and line[0].startswith("model: "), line  # config, then the error
        assert line[1].startswith("zeroi2v predict: error: cannot read video") and name in line[1]
    ann = tmp_path / "ann.txt"
    ann.write_text("trunc.mp4 0\n")
    assert main(["eval", model, "--ann", str(ann), "--root", str(tmp_path), "--set",
                 "data.on_error=raise", "--no-progress"]) == 2
    assert "cannot read video" in err_line(capsys)


def test_inference_refuses_settings_that_cannot_apply(tmp_path, trained, capsys):
    model = str(trained / "run" / "last")
    assert main(["eval", model, "--set", "model.timm_kwargs.embed_dim=64"]) == 2
    assert "model.timm_kwargs.embed_dim: does not apply to a trained model" in err_line(capsys)
    assert main(["predict", model, "x.mp4", "--set", "train.lr=1"]) == 2
    assert "train.lr: does not apply" in err_line(capsys)
    (tmp_path / "img.pth").write_bytes(b"x")
    assert main(["eval", model, "--pretrained", str(tmp_path / "img.pth")]) == 2
    assert "holds all its weights" in err_line(capsys)
    assert main(["predict", model, "x.mp4", "--topk", "0"]) == 2
    assert "--topk must be >= 1" in err_line(capsys)
    names = tmp_path / "n.txt"
    names.write_text("only-one\n")
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    assert main(["predict", model, str(video), "--class-names", str(names)]) == 2
    assert "has 1 names, the model 2 classes" in err_line(capsys)
    # labels that do not fit the model's head
    ann = tmp_path / "ann.txt"
    ann.write_text("x.mp4 5\n")
    assert main(["eval", model, "--ann", str(ann), "--no-progress"]) == 2
    assert "label 5 >= num_classes=2" in err_line(capsys)


def test_help_says_what_files_each_command_takes(capsys):
    for cmd in ("eval", "predict", "merge", "export"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "config.json" in out and "checkpoint" in out, cmd


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["eval", str(tmp_path / "nope"), "--debug"])


# ----------------------------------------------------------------------------- stated settings


def test_train_states_what_it_will_do(tmp_path, data, capsys):
    cfg = cfg_dict(data, train={"epochs": 1, "scale_lr": True, "ref_batch_size": 64,
                                "lr": 1e-3})
    assert main(["train", write(tmp_path / "c.yaml", cfg), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    for part in ("8 training videos", "uniform, 4 segments", "lr 3.13e-05",
                 "train.lr 0.001 x global batch 2 / train.ref_batch_size 64", "STDHA backend",
                 "fused adapters off", str(tmp_path / "r")):
        assert part in out, part
    setup = [json.loads(x) for x in (tmp_path / "r/log.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "setup"][0]
    assert setup["head_offsets"] == [1, -1, 0, 0] and setup["lr"] == pytest.approx(1e-3 * 2 / 64)
    assert setup["stdha_backend"] == "torch" and setup["fused_adapters"] is False


# ----------------------------------------------------------------------------- output folders


def test_output_folder_is_never_overwritten_by_accident(tmp_path, data, capsys):
    cfg = write(tmp_path / "c.yaml", cfg_dict(data, train={"epochs": 1}))
    out = str(tmp_path / "r")
    assert main(["train", cfg, "--out", out]) == 0
    log = (tmp_path / "r/log.jsonl").read_text()
    assert main(["train", cfg, "--out", out]) == 2
    assert "holds a previous run" in err_line(capsys)
    assert (tmp_path / "r/log.jsonl").read_text() == log  # untouched
    assert main(["train", cfg, "--out", out, "--overwrite"]) == 0
    assert len((tmp_path / "r/log.jsonl").read_text().splitlines()) == len(log.splitlines())
    assert main(["train", cfg, "--out", str(tmp_path / "fresh"), "--resume"]) == 2
    assert "nothing to resume" in err_line(capsys)


# ----------------------------------------------------------------------------- determinism


def _epoch_losses(out):
    return [json.loads(x)["train_loss"] for x in (Path(out) / "log.jsonl").read_text().splitlines()
            if json.loads(x)["type"] == "epoch"]


def test_progress_bars_and_workers_do_not_change_the_numbers(tmp_path, data):
    from zeroi2v.train.engine import train

    runs = {}
    for name, progress, workers in (("bars", True, 0), ("quiet", False, 0), ("workers", False, 2)):
        cfg = load_config(None, base=cfg_dict(data, train={"progress": progress,
                                                           "out_dir": str(tmp_path / name)},
                                              data={"num_workers": workers}))
        train(cfg)
        runs[name] = _epoch_losses(tmp_path / name)
    assert len(runs["bars"]) == 2
    assert runs["bars"] == runs["quiet"] == runs["workers"], runs


def test_ctrl_c_prints_a_command_that_continues_exactly(tmp_path, data, capsys, monkeypatch):
    """The printed command, run as printed, finishes the run bit for bit as if never stopped,
    though the run was started with --set options the command does not repeat."""
    import shlex

    from safetensors.torch import load_file

    import zeroi2v.train.engine as engine

    cfg = write(tmp_path / "c.yaml", cfg_dict(data, train={"epochs": 2}))
    sets = ["--set", "train.epochs=3", "--set", "train.lr=2e-3", "--set", "model.head_dropout=0.3"]
    assert main(["train", cfg, "--out", str(tmp_path / "whole"), *sets]) == 0
    real = engine.train_one_epoch

    def interrupted(run, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(run, epoch)

    monkeypatch.setattr(engine, "train_one_epoch", interrupted)
    out = str(tmp_path / "r")
    capsys.readouterr()
    assert main(["train", cfg, "--out", out, *sets]) == 130
    line = err_line(capsys)
    assert "interrupted (Ctrl-C) in epoch 2" in line and "(epoch 1)" in line
    command = line.split("continue with: ", 1)[1]
    assert command == f"zeroi2v train --resume --out {out}"
    monkeypatch.setattr(engine, "train_one_epoch", real)
    assert main(shlex.split(command)[1:]) == 0
    assert _epoch_losses(tmp_path / "whole") == _epoch_losses(out)  # epoch 1, then 2 and 3
    a = load_file(str(tmp_path / "whole" / "last" / "model.safetensors"))
    b = load_file(str(Path(out) / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_ends_training_with_exit_130(tmp_path, data):
    cfg = write(tmp_path / "c.yaml", cfg_dict(data, train={"epochs": 200}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "zeroi2v.cli", "train", cfg, "--out",
                          str(tmp_path / "r")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    log = tmp_path / "r/log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if log.is_file() and '"type": "epoch"' in log.read_text():
            break
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert "last complete checkpoint" in err and "--resume" in err


def test_eval_json_is_rounded_and_top5_only_when_meaningful(tmp_path, trained):
    out = tmp_path / "e.json"
    assert main(["eval", str(trained / "run"), "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert "top5" not in res  # 2 classes

    def floats(x):
        if isinstance(x, float):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from floats(v)
        elif isinstance(x, list):
            for v in x:
                yield from floats(v)

    assert all(round(v, 4) == v for v in floats(res))
