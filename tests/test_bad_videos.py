"""Unreadable and short videos: evaluation never substitutes, counts and lists; training skips
visibly; ``on_error`` drop / skip / raise in both, through the command line. Tiny data only."""
import json
from pathlib import Path

import numpy as np
import pytest

from test_cli import write_cfg
from zeroi2v.cli import main
from zeroi2v.data import make_synthetic_dataset, read_annotations, write_annotations, write_video

BAD = ["missing.mp4", "bad/noise.mp4", "bad/half.mp4", "bad/empty.mp4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad")
    info = make_synthetic_dataset(out / "syn", num_classes=2, videos_per_class=6, num_frames=8, size=16,
                                  seed=0, val_fraction=0.34)
    root = Path(info["root"])
    (root / "bad").mkdir()
    (root / "bad/noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
    first = root / read_annotations(info["train"])[0][0]
    (root / "bad/half.mp4").write_bytes(first.read_bytes()[:250])
    (root / "bad/empty.mp4").write_bytes(b"")
    write_video(root / "short.mp4", np.full((3, 16, 16, 3), 90, np.uint8))  # 3 frames < 4 sampled
    val = read_annotations(info["val"])
    anns = {"good": val[:2], "bad": [val[0], (BAD[0], 0), (BAD[1], 1), val[1], (BAD[2], 0), (BAD[3], 1)],
            "short": val[:2] + [("short.mp4", 1)], "none": [(b, 0) for b in BAD]}
    train = read_annotations(info["train"])
    # unreadable training videos, never next to each other: each is met exactly once per epoch
    anns["train_bad"] = train[:3] + [(BAD[1], 0)] + train[3:6] + [(BAD[2], 1)] + train[6:8]
    for name, lines in anns.items():
        write_annotations(out / f"{name}.txt", lines)
    return {**info, "ann": {k: str(out / f"{k}.txt") for k in anns}, "out": out}


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ck")
    cfg = write_cfg(tmp / "cfg.yaml", data, epochs=1)
    assert main(["train", str(cfg), "--out", str(tmp / "run")]) == 0
    return tmp / "run" / "last"


def _eval(ck, ann, out, *extra):
    code = main(["eval", str(ck), "--ann", ann, "--out", str(out), "--no-progress", *extra])
    return code, (json.loads(Path(out).read_text()) if code == 0 else None)


@pytest.mark.parametrize("mode", ["skip", "drop"])
def test_eval_reports_exactly_the_readable_videos(data, checkpoint, tmp_path, capsys, mode):
    code, good = _eval(checkpoint, data["ann"]["good"], tmp_path / "good.json")
    assert code == 0 and good["num_samples"] == good["num_videos"] == 2 and good["num_skipped"] == 0
    capsys.readouterr()
    code, res = _eval(checkpoint, data["ann"]["bad"], tmp_path / "bad.json", "--set", f"data.on_error={mode}")
    assert code == 0
    assert (res["num_samples"], res["num_videos"], res["num_skipped"]) == (2, 6, 4)
    assert [Path(s["path"]).name for s in res["skipped"]] == [
        Path(b).name for b in (BAD[0], BAD[1], BAD[2], BAD[3])]
    assert all(s["reason"] for s in res["skipped"])
    for k in ("top1", "mean_class_acc", "confusion_matrix", "per_class_acc"):
        assert res[k] == good[k], k  # the metrics of the two readable videos, nothing duplicated
    assert sum(map(sum, res["confusion_matrix"])) == 2
    text = capsys.readouterr().out
    assert "2 of 6 videos evaluated" in text and "4 unreadable" in text
    assert all(Path(b).name in text for b in BAD)


def test_eval_raise_fails_with_one_line_and_workers_agree(data, checkpoint, tmp_path, capsys):
    for workers in (0, 2):
        code, _ = _eval(checkpoint, data["ann"]["bad"], tmp_path / "r.json", "--set", "data.on_error=raise",
                        "--set", f"data.num_workers={workers}")
        # the model's config line, then the error in one line
        err = "\n".join(x for x in capsys.readouterr().err.strip().splitlines()
                        if not x.startswith(("model: ", "evaluating ", "note: ")))
        assert code == 2 and err.startswith("zeroi2v eval: error: cannot read video") and "\n" not in err, err
        assert "missing.mp4" in err or "noise.mp4" in err
    _, one = _eval(checkpoint, data["ann"]["bad"], tmp_path / "w0.json")
    _, two = _eval(checkpoint, data["ann"]["bad"], tmp_path / "w2.json", "--set", "data.num_workers=2")
    for k in ("num_samples", "num_skipped", "skipped", "top1", "confusion_matrix"):
        assert one[k] == two[k], k
    code, _ = _eval(checkpoint, data["ann"]["none"], tmp_path / "n.json")
    err = capsys.readouterr().err
    assert code == 2 and "none of the 4 videos could be read" in err


def test_short_videos_are_counted(data, checkpoint, tmp_path, capsys):
    code, res = _eval(checkpoint, data["ann"]["short"], tmp_path / "s.json")
    assert code == 0 and res["num_samples"] == 3 and res["num_short"] == 1 and res["num_skipped"] == 0
    assert "1 shorter than the clip" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["skip", "drop"])
def test_training_counts_skipped_videos_per_epoch(data, tmp_path, capsys, mode):
    cfg = write_cfg(tmp_path / "cfg.yaml",
                    {**data, "train": data["ann"]["train_bad"], "val": data["ann"]["bad"]},
                    epochs=2, batch_size=5, log_interval=1)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--set", f"data.on_error={mode}",
                 "--set", "train.progress=true"]) == 0
    log = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if r["type"] == "epoch"]
    assert len(epochs) == 2
    for r in epochs:  # every index is visited once per epoch (10 samples, 2 batches of 5)
        assert r["skipped_videos"] == 2 and r["short_videos"] == 0
        assert sorted(Path(s["path"]).name for s in r["skipped"]) == ["half.mp4", "noise.mp4"]
        assert (r["val"]["num_samples"], r["val"]["num_videos"], r["val"]["num_skipped"]) == (2, 6, 4)
    text = capsys.readouterr().out
    assert text.count("2 unreadable videos skipped") == 2 and "(2 of 6 videos)" in text
    res = json.loads((tmp_path / "run/val_results.json").read_text())
    assert res["num_skipped"] == 4 and len(res["skipped"]) == 4


def test_training_drop_skips_a_batch_with_no_readable_video(data, tmp_path):
    train = read_annotations(data["train"])
    ann = tmp_path / "t.txt"
    write_annotations(ann, [train[0], (BAD[1], 0), train[1], (BAD[2], 1)])
    cfg = write_cfg(tmp_path / "cfg.yaml", {**data, "train": str(ann), "val": data["ann"]["good"]},
                    epochs=1, batch_size=1)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--set", "data.on_error=drop"]) == 0
    log = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in log if r["type"] == "epoch"]
    assert epoch["skipped_videos"] == 2 and epoch["step"] == 2  # the two empty batches took no step
    code = main(["train", str(cfg), "--out", str(tmp_path / "run2"), "--set", "data.on_error=raise"])
    assert code == 2
