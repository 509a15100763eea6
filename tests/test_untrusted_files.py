"""More files that must not take over or exhaust the machine (issue #21, found by probing the
first round of checks): codec and zip bombs in pickles, training states, symlinked locks, YAML
aliases, deep nesting, huge integers, lying shard indexes, edited run configs."""
from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from _helpers import cfg_dict, rewrite_zip, synthetic_videos, write
from zeroi2v import create_video_model, load_model, settings
from zeroi2v.cli import main
from zeroi2v.limits import LimitError
from zeroi2v.safe_io import FolderLockedError, folder_lock, read_checkpoint, read_state_dict

TINY = dict(img_size=32, depth=1, embed_dim=32, num_heads=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_videos(tmp_path_factory)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "m"
    create_video_model("vit_small_patch16_224", 2, 3, head_offsets="spatial",
                       **TINY).save_pretrained(folder)
    return folder


def _zip_with(path, records: dict):
    with zipfile.ZipFile(path, "w") as z:
        for name, (data, compress) in records.items():
            z.writestr(name, data, compress_type=compress)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ----------------------------------------------------------------------------- pickles


def test_codec_bombs_are_refused(tmp_path):
    """_codecs.encode(x, 'hex') nested twenty times doubled memory twenty times."""
    payload = b"\x80\x02X\x01\x00\x00\x00a"
    for _ in range(20):
        payload = b"\x80\x02c_codecs\nencode\n" + payload[2:] + b"X\x03\x00\x00\x00hex\x86R"
    path = tmp_path / "bomb.pth"
    torch.save({"w": torch.ones(2)}, path)
    rewrite_zip(path, lambda n, d: payload + b"." if n.endswith("data.pkl") else d)
    with pytest.raises(ValueError, match="only latin-1 text is read"):
        read_checkpoint(path)
    # the latin-1 form torch writes for bytes still reads
    legit = b"\x80\x02}X\x01\x00\x00\x00bc_codecs\nencode\nX\x02\x00\x00\x00hiX\x06\x00\x00\x00latin1\x86Rs."
    _zip_with(path, {"archive/data.pkl": (legit, zipfile.ZIP_STORED),
                     "archive/version": (b"3\n", zipfile.ZIP_STORED)})
    assert read_checkpoint(path) == {"b": b"hi"}


@pytest.mark.parametrize("torchscript", [False, True], ids=["pickle", "torchscript"])
def test_a_pickle_record_that_inflates_is_refused_before_reading(tmp_path, torchscript):
    path = tmp_path / "zb.pt"
    records = {"archive/data.pkl": (b"\x80\x02}." + b"\0" * (300 << 20), zipfile.ZIP_DEFLATED),
               "archive/version": (b"3\n", zipfile.ZIP_STORED)}
    if torchscript:
        records["archive/constants.pkl"] = (pickle.dumps(()), zipfile.ZIP_STORED)
    _zip_with(path, records)
    assert path.stat().st_size < 2 << 20
    with pytest.raises(LimitError, match="its pickle archive/data.pkl claims 314.6 MB"):
        read_checkpoint(path)


def test_storage_types_cannot_be_called(tmp_path):
    # REDUCE torch.FloatStorage(3e9) in a TorchScript data.pkl: 12 GB reserved before
    payload = b"\x80\x02}X\x01\x00\x00\x00xctorch\nFloatStorage\n\x8a\x04\x00^\xd0\xb2\x85Rs."
    path = tmp_path / "ts.pt"
    _zip_with(path, {"archive/data.pkl": (payload, zipfile.ZIP_STORED),
                     "archive/constants.pkl": (pickle.dumps(()), zipfile.ZIP_STORED)})
    with pytest.raises(ValueError, match="cannot be read"):
        read_checkpoint(path)


def test_deeply_nested_files_are_one_line(tmp_path, saved, capsys):
    import shutil

    deep = "[" * 100_000 + "]" * 100_000
    p = tmp_path / "deep.safetensors"
    header = ('{"a": ' + deep + "}").encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError, match="nests deeper"):
        read_checkpoint(p)
    shutil.copytree(saved, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"format": "zeroi2v", "x": ' + deep + "}")
    assert main(["predict", str(tmp_path / "m"), "v.mp4"]) == 2
    assert "nests its JSON deeper" in _one_line(capsys)
    # a TorchScript archive whose modules nest 5,000 deep
    nested = b"\x80\x02" + b"}X\x01\x00\x00\x00k" * 5000 + b"}" + b"s" * 5000 + b"."
    ts = tmp_path / "deep.pt"
    _zip_with(ts, {"archive/data.pkl": (nested, zipfile.ZIP_STORED),
                   "archive/constants.pkl": (pickle.dumps(()), zipfile.ZIP_STORED)})
    with pytest.raises(ValueError, match="nests its modules deeper"):
        read_state_dict(ts)


def test_impossible_tensor_shapes_are_refused(tmp_path):
    for shape in ([0, 2**70], [0, 2**40, 2**40]):
        h = json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
        (tmp_path / "s.safetensors").write_bytes(struct.pack("<Q", len(h)) + h)
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            read_checkpoint(tmp_path / "s.safetensors")


# ----------------------------------------------------------------------------- training states


def _trained(tmp_path, data):
    out = tmp_path / "run"
    cfg = write(tmp_path / "c.yaml", cfg_dict(data, train={"epochs": 2}))
    assert main(["train", cfg, "--out", str(out), "--set", "train.stop_after_epoch=1"]) == 0
    return out, cfg


def _resign(folder: Path, name: str, key: str) -> None:
    """Record ``name``'s new SHA-256 everywhere the save recorded it (config.json and the
    weights' metadata copy, then the weights' own hash), as an attacker who edits all would."""
    from safetensors.torch import load_file, save_file

    from zeroi2v.models.artefact import SHA_KEY, file_digest

    doc = json.loads((folder / "config.json").read_text())
    doc["artefact"][key] = file_digest(folder / name)["sha256"]
    meta = {k: v for k, v in doc["artefact"].items() if k not in (SHA_KEY, "run_config_sha256")}
    w = folder / "model.safetensors"
    save_file(load_file(str(w)), str(w),
              metadata={"format": "pt", "zeroi2v_config": json.dumps(dict(doc, artefact=meta))})
    doc["artefact"][SHA_KEY] = file_digest(w)["sha256"]
    (folder / "config.json").write_text(json.dumps(doc))


def test_a_training_state_goes_through_the_restricted_reader(tmp_path, data, capsys):
    out, _ = _trained(tmp_path, data)
    last = (out / "last").resolve()
    # bytearray(6e9), which torch's weights-only loader would run, is an inert placeholder, and
    # a state without the keys a resume reads is one line
    torch.save({"format": "zeroi2v-training-state", "version": 1, "x": bytearray(8)},
               last / "training_state.pt")
    _resign(last, "training_state.pt", "training_state_sha256")
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out)]) == 2
    assert "cannot be read as a training state" in _one_line(capsys)


def test_a_hand_edited_run_config_is_not_resumed_unseen(tmp_path, data, capsys):
    out, _ = _trained(tmp_path, data)
    last = (out / "last").resolve()
    text = (last / "run_config.yaml").read_text()
    (last / "run_config.yaml").write_text(text.replace("lr: 0.001", "lr: 0.5"))
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out)]) == 2
    assert "run_config.yaml is damaged" in _one_line(capsys)


def test_a_run_config_that_is_not_a_mapping_is_one_line(tmp_path, saved, capsys):
    import shutil

    shutil.copytree(saved, tmp_path / "m")
    (tmp_path / "m" / "run_config.yaml").write_text("- 1\n")
    assert main(["predict", str(tmp_path / "m"), "v.mp4"]) == 2
    assert "a run config is a mapping of sections" in _one_line(capsys)


# ----------------------------------------------------------------------------- YAML


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi")) + "train: {lr: *i}\n"


def test_yaml_aliases_are_refused_in_configs_and_model_folders(tmp_path, saved, capsys):
    (tmp_path / "laughs.yaml").write_text(LAUGHS)
    assert main(["config", str(tmp_path / "laughs.yaml")]) == 2
    assert "YAML aliases (*name) are not read" in _one_line(capsys)
    import shutil

    shutil.copytree(saved, tmp_path / "m")
    (tmp_path / "m" / "run_config.yaml").write_text(LAUGHS)
    assert main(["predict", str(tmp_path / "m"), "v.mp4"]) == 2
    assert "YAML aliases" in _one_line(capsys)


def test_error_messages_show_untrusted_values_bounded(capsys):
    assert main(["config", "--set", "train.lr=[" + ",".join(["1"] * 100_000) + "]"]) == 2
    assert len(_one_line(capsys)) < 400


# ----------------------------------------------------------------------------- folders


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".zeroi2v.lock").symlink_to(victim)
    with pytest.raises(FolderLockedError, match="is a symbolic link"):
        with folder_lock(out, "train"):
            pass
    assert victim.read_text() == "precious\n"


def test_out_paths_are_values_not_yaml(tmp_path, data):
    cfg = write(tmp_path / "c.yaml", cfg_dict(data, train={"epochs": 1}))
    out = tmp_path / "exp #3"
    assert main(["train", cfg, "--out", str(out)]) == 0
    assert (out / "last").exists() and not (tmp_path / "exp").exists()


def test_a_lying_shard_index_is_refused_and_nothing_is_deleted(tmp_path, data, capsys):
    from zeroi2v.data.shard_writer import INDEX_NAME

    src = Path(data["root"])
    dst = tmp_path / "shards"
    assert main(["prepare", str(src / "videos"), str(dst), "--shards", "--short-side", "16",
                 "--no-progress"]) == 0
    index = json.loads((dst / INDEX_NAME).read_text())
    index["shards"][0]["file"] = "/etc/passwd"
    (dst / INDEX_NAME).write_text(json.dumps(index))
    before = sorted(p.name for p in dst.iterdir())
    capsys.readouterr()
    assert main(["prepare", str(src / "videos"), str(dst), "--shards", "--short-side", "16",
                 "--no-progress"]) == 2
    assert "a shard entry this zeroi2v did not write" in _one_line(capsys)
    assert sorted(p.name for p in dst.iterdir()) == before


# ----------------------------------------------------------------------------- sizes


def test_evaluation_views_and_the_confusion_matrix_are_checked_before_training(tmp_path, data,
                                                                              capsys):
    cfg = write(tmp_path / "c.yaml", cfg_dict(data))
    assert main(["train", cfg, "--out", str(tmp_path / "r"),
                 "--set", "eval.num_clips=100000000"]) == 2
    assert "evaluation (a batch of 4 videos x 100000000 views" in _one_line(capsys)
    with settings.override(memory_limit=100 << 20):
        assert main(["train", cfg, "--out", str(tmp_path / "r"),
                     "--set", "model.num_classes=5000"]) == 2
    assert "the confusion matrix of 5,000 classes" in _one_line(capsys)
    assert not (tmp_path / "r").exists()


def test_a_non_utf8_annotation_file_is_named(tmp_path, data, capsys):
    ann = tmp_path / "ann.txt"
    ann.write_bytes(b"\xff\xfe bad\n")
    cfg = write(tmp_path / "c.yaml", cfg_dict(data, data={"train_ann": str(ann)}))
    assert main(["train", cfg, "--out", str(tmp_path / "r")]) == 2
    assert f"{ann} is not UTF-8 text" in _one_line(capsys)


def test_huge_integers_in_a_model_config_are_one_line(tmp_path, saved, capsys):
    import shutil

    for key, value, says in (("num_frames", 10**30, "num_frames is"),
                             ("adapter_ratio", 1e300, "adapter_ratio must be in (0, 64]")):
        shutil.rmtree(tmp_path / "m", ignore_errors=True)
        shutil.copytree(saved, tmp_path / "m")
        doc = json.loads((tmp_path / "m" / "config.json").read_text())
        doc[key] = value
        (tmp_path / "m" / "config.json").write_text(json.dumps(doc))
        from safetensors.torch import load_file, save_file  # a hand-edited folder: no metadata
        w = tmp_path / "m" / "model.safetensors"
        save_file(load_file(str(w)), str(w), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=says.replace("(", r"\(").replace("]", r"\]")):
            load_model(tmp_path / "m")
        assert main(["predict", str(tmp_path / "m"), "v.mp4"]) == 2
        assert says in _one_line(capsys)
