"""A label means the same class everywhere: the class list beside an annotation file (or in a
shard index) names the model's classes, and data numbered in another order is refused instead
of scoring the wrong class."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from _helpers import cfg_dict, synthetic_videos, write
from zeroi2v import load_model
from zeroi2v.cli import main
from zeroi2v.data.annotations import same_classes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_videos(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    cfg = write(out.parent / "c.yaml", cfg_dict(data, train={"epochs": 1}))
    assert main(["train", cfg, "--out", str(out)]) == 0
    return out


def _elsewhere(data, folder: Path, classes: list[str]) -> str:
    """The validation annotation file in another folder, with ``classes`` as its class list."""
    folder.mkdir()
    ann = folder / "val.txt"
    shutil.copy(data["val"], ann)
    (folder / "classes.txt").write_text("\n".join(classes) + "\n")
    return str(ann)


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_the_training_data_names_the_model_classes(trained, data):
    """Without data.class_names the run takes the classes.txt beside the training annotations."""
    assert list(load_model(trained / "last").class_names) == data["classes"]


def test_eval_refuses_data_numbered_in_another_class_order(trained, data, tmp_path, capsys):
    swapped = _elsewhere(data, tmp_path / "swapped", data["classes"][::-1])
    out = tmp_path / "e.json"
    assert main(["eval", str(trained), "--ann", swapped, "--root", data["root"],
                 "--out", str(out), "--no-progress"]) == 2
    err = _err(capsys)[-1]  # (after the line describing the model)
    assert "another order than the model" in err and "Traceback" not in err, err
    assert f"its label 0 is {data['classes'][-1]!r}" in err
    assert "--classes" in err and not out.exists()
    same = _elsewhere(data, tmp_path / "same", data["classes"])
    assert main(["eval", str(trained), "--ann", same, "--root", data["root"], "--out", str(out),
                 "--no-progress"]) == 0
    assert out.is_file()


def test_training_refuses_validation_data_in_another_class_order(data, tmp_path, capsys):
    swapped = _elsewhere(data, tmp_path / "swapped", data["classes"][::-1])
    cfg = write(tmp_path / "c.yaml", cfg_dict(data, data={"val_ann": swapped}))
    assert main(["train", cfg, "--out", str(tmp_path / "r")]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "the validation data" in err[0] and "another order" in err[0], err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_class_list_that_does_not_cover_the_labels_is_refused(data, tmp_path, capsys):
    short = _elsewhere(data, tmp_path / "short", data["classes"][:1])
    assert main(["eval", str(tmp_path / "nothing"), "--ann", short]) == 2  # (model first)
    capsys.readouterr()
    cfg = write(tmp_path / "c.yaml", cfg_dict(data, data={"val_ann": short}))
    assert main(["train", cfg, "--out", str(tmp_path / "r")]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "names 1 classes, but" in err[0] and "uses label 1" in err[0], err


def test_same_classes_accepts_a_prefix_and_refuses_more_classes():
    same_classes(["a", "b", "c"], ["a", "b"], model_source="m", data_source="d")  # a subset
    same_classes(None, ["x"], model_source="m", data_source="d")  # nothing to check
    with pytest.raises(ValueError, match="has 2: the data has classes the model cannot"):
        same_classes(["a", "b"], ["a", "b", "c"], model_source="m", data_source="d")
    with pytest.raises(ValueError, match="2 of 3 labels differ"):
        same_classes(["a", "b", "c"], ["a", "c", "b"], model_source="m", data_source="d")


def test_a_shard_index_names_its_classes(data, tmp_path):
    from zeroi2v.data import build_dataset
    from zeroi2v.data.shard_writer import pack_shards

    index = tmp_path / "s"
    pack_shards(data["val"], data["root"], index, classes=data["classes"][::-1])
    ds = build_dataset(str(index / "shards.json"), "", num_frames=4, train=False, size=16)
    assert ds.class_names == data["classes"][::-1]
    assert ds.class_names_file == str(index / "shards.json")


def test_data_class_names_must_be_the_data_classes(data, tmp_path, capsys):
    """data.class_names naming the classes in another order (or spelling) than the data's own
    classes.txt would name the model's outputs wrongly: refused before training."""
    swapped = tmp_path / "names.txt"
    swapped.write_text("\n".join(data["classes"][::-1]) + "\n")
    cfg = write(tmp_path / "c.yaml", cfg_dict(data, data={"class_names": str(swapped)}))
    assert main(["train", cfg, "--out", str(tmp_path / "r")]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "name label 0 differently" in err[0], err
    assert "unset data.class_names" in err[0] and not (tmp_path / "r" / "checkpoints").exists()
    same = tmp_path / "same.txt"
    same.write_text("\n".join(data["classes"]) + "\n")
    cfg = write(tmp_path / "c2.yaml", cfg_dict(data, data={"class_names": str(same)},
                                               train={"epochs": 1}))
    assert main(["train", cfg, "--out", str(tmp_path / "r2")]) == 0


def test_eval_says_what_it_evaluates_and_when_labels_go_unchecked(trained, data, tmp_path,
                                                                   capsys, monkeypatch):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(data["val"], bare / "val.txt")  # a hand-written list: no classes.txt beside it
    assert main(["eval", str(trained / "best"), "--ann", str(bare / "val.txt"), "--root",
                 data["root"], "--out", str(tmp_path / "e.json"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"evaluating {(trained / 'best').resolve()} on {bare / 'val.txt'}" in err
    assert f"note: no classes.txt beside {bare / 'val.txt'}" in err
    # the run config's relative annotation path, read from another directory
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(trained), "--ann", "nope/val.txt"]) == 2
    err = _err(capsys)[-1]
    assert f"annotation file not found: nope/val.txt, relative to {tmp_path}" in err, err


def test_reports_name_the_classes_the_data_names_and_number_the_rest():
    from zeroi2v.train.metrics import class_names_or_ids

    assert class_names_or_ids(3, ["a", "b"]) == ["a", "b", "2"]
    assert class_names_or_ids(2, ["a", "b", "c"]) == ["a", "b"]
    assert class_names_or_ids(2, None) == ["0", "1"]


@pytest.mark.parametrize("text,want", [
    ("1 backward\n0 forward\n", ["forward", "backward"]),     # ids, in any order
    ("0,forward\n1,backward\n", ["forward", "backward"]),
    ("forward\nbackward\r\n", ["forward", "backward"]),        # names only: line order
    ("\ufeffforward\nbackward\n", ["forward", "backward"]),    # a byte-order mark is no name
    ("1,fwd\nback\n", ["1,fwd", "back"]),                      # not every line has an id
    ("100 metre dash\nswim\n", ["100 metre dash", "swim"]),
    ("id,name\n0,forward\n1,backward\n", "remove the header line"),
    ("0 a\n2 b\n", "the class ids are 0, 2, not 0 .. 1 each once"),
])
def test_class_files_with_ids_are_read_by_id(tmp_path, text, want):
    from zeroi2v.data.annotations import read_class_names

    p = tmp_path / "classes.txt"
    p.write_text(text, encoding="utf-8")
    if isinstance(want, list):
        assert read_class_names(p) == want
    else:
        with pytest.raises(ValueError, match=want):
            read_class_names(p)


def test_a_classes_txt_that_is_no_file_is_refused(data, tmp_path, capsys):
    import os

    folder = tmp_path / "v"
    folder.mkdir()
    shutil.copy(data["val"], folder / "val.txt")
    os.symlink("/dev/zero", folder / "classes.txt")
    cfg = write(tmp_path / "c.yaml", cfg_dict(data, data={"val_ann": str(folder / "val.txt")}))
    assert main(["train", cfg, "--out", str(tmp_path / "r")]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "classes.txt is a device or socket, not a class-name file" in err[0]


def test_class_names_are_drawn_as_text_not_mathtext(tmp_path):
    import numpy as np

    from zeroi2v.train.metrics import plot_confusion_matrix

    out = plot_confusion_matrix(np.eye(2, dtype=np.int64), tmp_path / "cm.png",
                                ["cost $\\badcmd{x}$", "back_$x^$ward"])
    assert Path(out).stat().st_size > 1000
