"""Files and configs that try to take over or exhaust the machine (issue #21): timm arguments
are data, the unpickler changes nothing it did not make, and every size is checked before it
is allocated."""
from __future__ import annotations

import collections
import json
import pickle
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from _helpers import rewrite_zip
from zeroi2v import ZeroI2VConfig, ZeroI2VViT, create_video_model, load_model, settings
from zeroi2v.cli import main
from zeroi2v.limits import LimitError
from zeroi2v.models.timm_args import ACT_LAYERS, ALLOWED, NORM_LAYERS, check_timm_kwargs
from zeroi2v.safe_io import read_checkpoint, read_state_dict

TINY = dict(img_size=32, depth=1, embed_dim=32, num_heads=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "m"
    create_video_model("vit_small_patch16_224", 2, 3, head_offsets="spatial",
                       **TINY).save_pretrained(folder)
    return folder


def _edit_config(folder, tmp_path, **changes):
    """A copy of the saved model whose config.json differs by ``changes`` (the safetensors
    metadata is left as it was, so only config.json speaks)."""
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    doc = json.loads((out / "config.json").read_text())
    for k, v in changes.items():
        if k == "timm_kwargs":
            doc[k] = dict(doc[k], **v)
        else:
            doc[k] = v
    (out / "config.json").write_text(json.dumps(doc))
    # the metadata copy would be refused as "another save": drop it, as a hand-edited file has
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(out / "model.safetensors"))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ----------------------------------------------------------------------------- timm arguments


class _Evil:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("key,value,says", [
    ("checkpoint_path", "weights.pth", "checkpoint_path: not allowed (it makes timm load that file)"),
    ("act_layer", "os.system", "layers are named, not imported"),
    ("pretrained_cfg_overlay", {"file": "x"}, "pretrained_cfg_overlay: not allowed"),
    ("cache_dir", "/tmp", "cache_dir: not allowed"),
    ("pretrained", True, "pretrained: not allowed"),
    ("norm_layer", "torch.nn.LayerNorm", "not one of"),
    ("depth", 100000, "depth: must be in [1, 1024]"),
    ("embed_dim", 65536, "embed_dim: must be in [1, 16384]"),
    ("block_fn", "Block", "not an architecture argument zeroi2v accepts"),
])
def test_a_model_folder_cannot_reach_timm_with_a_door(saved, tmp_path, capsys, key, value, says):
    """A pickle next to config.json stays unread, whatever timm version is installed: the
    config is refused before timm is called."""
    sentinel = tmp_path / "PWNED"
    bad = _edit_config(saved, tmp_path, timm_kwargs={key: value})
    torch.save({"state_dict": _Evil(sentinel)}, bad / "weights.pth")
    if key == "checkpoint_path":
        doc = json.loads((bad / "config.json").read_text())
        doc["timm_kwargs"][key] = str(bad / "weights.pth")
        (bad / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"timm_kwargs.{key}"):
        load_model(bad)
    capsys.readouterr()
    assert main(["predict", str(bad), str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not sentinel.exists()


def test_the_same_check_guards_every_entry_point(tmp_path):
    from zeroi2v.interop import load_clip_weights
    from zeroi2v.train.config import load_config

    with pytest.raises(ValueError, match="model.timm_kwargs.checkpoint_path: not allowed"):
        load_config(None, ["model.timm_kwargs.checkpoint_path=x.pth"])
    with pytest.raises(ValueError, match="timm_kwargs.checkpoint_path"):
        create_video_model("vit_small_patch16_224", 2, 3, checkpoint_path="x.pth", **TINY)
    with pytest.raises(ValueError, match="timm_kwargs.cache_dir"):
        ZeroI2VConfig("vit_small_patch16_224", 2, 3, timm_kwargs={"cache_dir": "/tmp"})
    with pytest.raises(ValueError, match="must be a timm architecture name"):
        ZeroI2VConfig("hf-hub:someone/model", 2, 3)
    with pytest.raises(ValueError, match="timm_kwargs.checkpoint_path"):
        load_clip_weights("vit_small_patch16_224", tmp_path / "x.pth", checkpoint_path="x.pth")
    # a layer class from Python code is fine (the model cannot be saved, as before)
    m = create_video_model("vit_small_patch16_224", 2, 3, act_layer=torch.nn.GELU, **TINY)
    assert m.config.timm_kwargs is None


def test_the_vocabulary_is_what_timm_builds():
    import timm.layers as tl

    for name in ACT_LAYERS:
        assert tl.get_act_layer(name) is not None, name
    for name in NORM_LAYERS:
        assert tl.get_norm_layer(name) is not None, name
    assert check_timm_kwargs({"act_layer": "GELU", "img_size": [32, 48]}) == \
        {"act_layer": "gelu", "img_size": [32, 48]}
    assert len(ALLOWED) > 40


# ----------------------------------------------------------------------------- the unpickler


def _zip_with_data_pkl(path, payload: bytes, torchscript: bool = False):
    """A torch.save zip whose data.pkl is ``payload`` (TorchScript-looking when asked)."""
    torch.save({"w": torch.ones(2)}, path)
    rewrite_zip(path, lambda n, data: payload if n.endswith("data.pkl") else data,
                extra={"archive/constants.pkl": pickle.dumps(())} if torchscript else None)


def _gadget(module: str, name: str, attr: str, value: bytes) -> bytes:
    """GLOBAL module.name, then BUILD (None, {attr: value}): set ``attr`` on an allowed object."""
    return (b"\x80\x02" + f"c{module}\n{name}\n".encode() + b"N}" +
            b"X" + struct.pack("<I", len(attr)) + attr.encode() + value + b"s\x86b" +
            b"}X\x01\x00\x00\x00w" + b"\x88s." )  # (the gadget, then a dict {"w": True})


@pytest.mark.parametrize("torchscript", [False, True], ids=["pickle", "torchscript"])
@pytest.mark.parametrize("target", [
    ("torch._utils", "_rebuild_tensor_v2", "__defaults__", b"N\x85"),  # (None,)
    ("collections", "Counter", "__len__", b"N"),
    ("collections", "OrderedDict", "__repr__", b"N"),
])
def test_the_unpickler_changes_nothing_it_did_not_create(tmp_path, target, torchscript):
    import torch._utils as tu

    before = (tu._rebuild_tensor_v2.__defaults__, collections.Counter.__len__,
              collections.OrderedDict.__repr__)
    path = tmp_path / "gadget.pt"
    _zip_with_data_pkl(path, _gadget(*target), torchscript=torchscript)
    with pytest.raises(ValueError, match="refused|cannot be read"):
        read_checkpoint(path)
    assert (tu._rebuild_tensor_v2.__defaults__, collections.Counter.__len__,
            collections.OrderedDict.__repr__) == before


def test_setitems_on_a_class_is_refused(tmp_path):
    # GLOBAL collections.OrderedDict, then SETITEMS into the class itself
    payload = b"\x80\x02ccollections\nOrderedDict\n(X\x01\x00\x00\x00aNu."
    path = tmp_path / "setitems.pt"
    _zip_with_data_pkl(path, payload)
    with pytest.raises(ValueError, match="add items to the class collections.OrderedDict"):
        read_checkpoint(path)


def test_bytearray_and_other_allocators_are_inert(tmp_path):
    # REDUCE builtins.bytearray(10**11): torch's weights-only loader allows and runs it
    payload = b"\x80\x02}X\x01\x00\x00\x00xcbuiltins\nbytearray\n\x8a\x05\x00\xe8vH\x17\x85Rs."
    path = tmp_path / "bytearray.pt"
    _zip_with_data_pkl(path, payload)
    obj = read_checkpoint(path)
    assert type(obj["x"]).__name__ == "bytearray" and not isinstance(obj["x"], bytearray)


def test_real_checkpoints_still_load(tmp_path):
    sd = collections.OrderedDict(a=torch.randn(3, 4), b=torch.arange(5))
    sd._metadata = {"": {"version": 1}}  # what nn.Module.state_dict() carries (BUILD on it)
    p = tmp_path / "sd.pth"
    torch.save({"state_dict": sd, "meta": {"epoch": 3, "numbers": {1, 2}}}, p)
    got = read_state_dict(p)
    assert torch.equal(got["a"], sd["a"]) and torch.equal(got["b"], sd["b"])
    param = torch.nn.Parameter(torch.randn(2, 2))
    torch.save({"p": param}, p)
    assert torch.equal(read_state_dict(p)["p"], param.detach())


# ----------------------------------------------------------------------------- sizes


def _limited(nbytes):
    return settings.override(memory_limit=int(nbytes))


def test_a_stride_0_tensor_is_refused_before_it_is_copied(tmp_path):
    head = torch.randn(1, 64).expand(1_000_000, 64)  # 256 MB once copied, 256 bytes on disk
    p = tmp_path / "stride0.pth"
    torch.save({"state_dict": {"cls_head.fc_cls.weight": head}}, p)
    assert p.stat().st_size < 10_000
    with pytest.raises(ValueError, match="stride-0 or overlapping view"):
        read_state_dict(p)
    assert main(["import-official", str(p), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_a_zip_record_that_inflates_is_refused_before_reading(tmp_path):
    p = tmp_path / "bomb.pth"
    torch.save({"w": torch.ones(2)}, p)
    rewrite_zip(p, lambda n, data: (b"\0" * (64 << 20), zipfile.ZIP_DEFLATED)
                if n.endswith("data/0") else data)
    assert p.stat().st_size < 1 << 20
    with _limited(32 << 20), pytest.raises(LimitError, match="over the memory limit of 33.6 MB"):
        read_checkpoint(p)


def test_a_torchscript_archive_reads_each_storage_once(tmp_path, monkeypatch):
    p = tmp_path / "many_refs.pt"
    t = torch.randn(256)
    torch.save({f"t{i}": t[i:i + 1] for i in range(200)}, p)  # 200 views of one storage
    rewrite_zip(p, extra={"archive/constants.pkl": pickle.dumps(())})
    reads = []
    real = zipfile.ZipFile.read
    monkeypatch.setattr(zipfile.ZipFile, "read",
                        lambda self, name, pwd=None: reads.append(str(name)) or real(self, name, pwd))
    read_checkpoint(p)
    assert sum("/data/" in r or "data/0" in r for r in reads) == 1


@pytest.mark.parametrize("length", [2**63, 2**40, 7])
def test_a_lying_safetensors_header_is_one_line(tmp_path, capsys, length):
    p = tmp_path / "m" / "model.safetensors"
    p.parent.mkdir()
    p.write_bytes(struct.pack("<Q", length) + b'{"a": {"dtype": "F32", "shape": [2], '
                  b'"data_offsets": [0, 8]}}' + b"\0" * 8)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_checkpoint(p)
    assert main(["predict", str(p.parent), "v.mp4"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_safetensors_entries_must_fit_the_file_and_the_limit(tmp_path):
    def write(name, header: dict, data: bytes):
        h = json.dumps(header).encode()
        (tmp_path / name).write_bytes(struct.pack("<Q", len(h)) + h + data)
        return tmp_path / name

    p = write("big.safetensors", {"a": {"dtype": "F32", "shape": [1 << 30],
                                        "data_offsets": [0, 4 << 30]}}, b"\0" * 16)
    with pytest.raises(ValueError, match="does not fit bytes"):
        read_checkpoint(p)
    p = write("overlap.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
              b"\0" * 12)
    with pytest.raises(ValueError, match="overlap"):
        read_checkpoint(p)
    p = write("ok.safetensors", {"a": {"dtype": "F32", "shape": [1 << 20],
                                       "data_offsets": [0, 4 << 20]}}, b"\0" * (4 << 20))
    with _limited(1 << 20), pytest.raises(LimitError, match="needs 4.2 MB"):
        read_checkpoint(p)
    assert read_checkpoint(p)["a"].shape == (1 << 20,)


@pytest.mark.parametrize("change,says", [
    ({"timm_kwargs": {"depth": 1000, "embed_dim": 1024}},
     "parameters: depth 1000, embed_dim 1024, img_size 32, 3 classes, 2 frames) needs"),
    ({"num_classes": 900_000, "timm_kwargs": {"embed_dim": 4096, "num_heads": 2}},
     "900,000 classes, 2 frames) needs"),
    ({"num_classes": 100_000_000}, "num_classes is 100,000,000, over the 1,000,000 zeroi2v takes"),
    ({"num_frames": 10**30}, "num_frames is 1,000,000,000,000,000,000,000,000,000,000, over"),
    ({"timm_kwargs": {"class_token": False}}, "refuses these arguments: Token pooling needs"),
])
def test_a_config_that_would_not_fit_is_refused_in_seconds(saved, tmp_path, capsys, change, says):
    import time

    bad = _edit_config(saved, tmp_path, **change)
    t0 = time.perf_counter()
    assert main(["predict", str(bad), "v.mp4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    if says.endswith(") needs"):
        assert "over the memory limit" in err[0] and "ZEROI2V_MEMORY_LIMIT" in err[0]
    assert time.perf_counter() - t0 < 20


def test_buffers_count_towards_the_model_size(tmp_path):
    """BEiT's relative position index grows with the square of the tokens: a model of 19M
    parameters can ask for gigabytes of buffers."""
    from zeroi2v.models.video_vit import model_size

    cfg = ZeroI2VConfig("beit_base_patch16_224", 8, 4, timm_kwargs=dict(
        use_rel_pos_bias=True, img_size=256, patch_size=4, depth=16))
    params, _, buffers = model_size(cfg)
    assert buffers > 2e9 > 4 * params / 50
    with _limited(500e6), pytest.raises(LimitError, match="MB of buffers"):
        ZeroI2VViT.from_config(cfg)


def test_refusals_keep_memory_bounded(saved, tmp_path):
    """Refusing a 100,000,000-class model (13 GB) takes no more memory than refusing a missing
    model: both measured as peak RSS of a fresh process."""
    bad = _edit_config(saved, tmp_path, num_classes=100_000_000)

    def peak(model: str) -> int:
        code = ("import resource, sys\nfrom zeroi2v.cli import main\n"
                f"rc = main(['predict', {model!r}, 'v.mp4'])\n"
                "print(rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=300).stdout.split()
        assert out[0] == "2", out
        return int(out[1])  # KiB

    baseline = peak(str(tmp_path / "no_such_model"))
    assert peak(str(bad)) < baseline + 200_000


# ----------------------------------------------------------------------------- integrity


def _rewrite_weights(folder, tmp_path, change, name="changed"):
    """A copy of ``folder`` whose weights went through ``change(tensors)`` (config.json and the
    metadata kept, so only the weights differ)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = tmp_path / name
    shutil.copytree(folder, out)
    w = out / "model.safetensors"
    with safe_open(str(w), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(w))
    change(tensors)
    save_file(tensors, str(w), metadata=meta)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.float16])
def test_a_tensor_of_another_dtype_is_named_before_the_forward(saved, tmp_path, capsys, dtype):
    def change(t):
        t["head.weight"] = t["head.weight"].to(dtype)

    bad = _rewrite_weights(saved, tmp_path, change)
    with pytest.raises(ValueError, match=f"tensor 'head.weight' is {str(dtype)[6:]}, expected "
                                         "float32 like the model's other weights"):
        load_model(bad)
    capsys.readouterr()
    assert main(["predict", str(bad), "v.mp4"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_model_saved_in_bf16_loads_in_bf16(tmp_path):
    m = create_video_model("vit_small_patch16_224", 2, 3, head_offsets="spatial", **TINY)
    m.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    back = load_model(tmp_path / "bf16")
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_with_the_tensor_name(saved, tmp_path, value):
    from zeroi2v.models.artefact import SHA_KEY

    def change(t):
        t["temporal_embedding"][0, 0, 3] = value

    bad = _rewrite_weights(saved, tmp_path, change)
    doc = json.loads((bad / "config.json").read_text())
    del doc["artefact"][SHA_KEY]  # a file that was never hashed: the values are still checked
    (bad / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="tensor 'temporal_embedding' holds 1 NaN or infinite"):
        load_model(bad)


def test_a_flipped_byte_is_caught_by_the_recorded_hash(saved, tmp_path):
    import shutil

    shutil.copytree(saved, tmp_path / "flipped")
    w = tmp_path / "flipped" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's data: the header still parses
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is damaged: its SHA-256 differs"):
        load_model(tmp_path / "flipped")


# ----------------------------------------------------------------------------- training requests


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from zeroi2v.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_classes=2,
                                  videos_per_class=2, num_frames=8, size=16, seed=0,
                                  val_fraction=0.5)


def test_a_label_typo_is_refused_with_its_line_before_anything_is_built(videos, tmp_path, capsys):
    from _helpers import cfg_dict, write

    ann = tmp_path / "train.txt"
    lines = open(videos["train"]).read().splitlines()
    lines[1] = lines[1].rsplit(" ", 1)[0] + " 100000000"
    ann.write_text("\n".join(lines) + "\n")
    cfg = write(tmp_path / "c.yaml", cfg_dict(videos, data={"train_ann": str(ann)}))
    assert main(["train", cfg, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{ann}:2: label 100000000 is over the 1,000,000 classes" in err[0]
    assert not (tmp_path / "r").exists()
    # below that ceiling, the memory the head would take is what refuses it, naming the line
    lines[1] = lines[1].rsplit(" ", 1)[0] + " 900000"
    ann.write_text("\n".join(lines) + "\n")
    with _limited(50 << 20):
        assert main(["train", cfg, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "900,001 classes (the largest label, 900000, is on line 2 " \
        f"of {ann})" in err[0] and "over the memory limit" in err[0]
    assert not (tmp_path / "r").exists()


def test_a_huge_frame_count_is_refused_before_anything_is_built(videos, tmp_path, capsys):
    from _helpers import cfg_dict, write

    cfg = write(tmp_path / "c.yaml", cfg_dict(videos, model={"head_offsets": "spatial"}))
    with _limited(256 << 20):  # the tiny test ViT's 100,000-frame batch is ~0.9 GB
        assert main(["train", cfg, "--out", str(tmp_path / "r"),
                     "--set", "model.num_frames=100000"]) == 2
    err = capsys.readouterr().err
    assert "training (" in err and "100000 frames of 16x16, at least) needs" in err
    assert "lower train.batch_size, model.num_frames or data.size" in err
    assert not (tmp_path / "r").exists()
