"""The saved model: ZeroI2VConfig, save_pretrained / load_model, safe reading of every file, old
files, and bad input (issue #12)."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import timm
import torch

from zeroi2v import ZeroI2VConfig, ZeroI2VViT, create_video_model, load_model, merge_adapters
from zeroi2v.cli import main
from zeroi2v.safe_io import read_checkpoint

# (name, timm kwargs, head offsets): families whose structure the old exporter could not
# rebuild (fc_norm + registers, a distillation token) or that need a bias added by the merge
FAMILIES = [
    ("vit_small_patch16_224", dict(img_size=32, depth=2), [1, -1, 0, 0, 0, 0]),
    ("vit_base_patch16_reg4_gap_256", dict(img_size=32, depth=2, embed_dim=96, num_heads=4),
     [1, -1, 2, 0]),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, depth=2), [1, -1, 0]),
    ("vit_base_patch16_224", dict(img_size=32, depth=2, embed_dim=64, num_heads=4,
                                  qkv_bias=False), [0, 1, -1, 0]),
    ("vit_base_patch16_clip_quickgelu_224", dict(img_size=32, depth=2), "vit_b"),
]


def _randomize(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _video(model, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, model.num_frames, *model.backbone.patch_embed.img_size, generator=g)


@pytest.mark.parametrize("name,kw,offsets", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_save_load_same_logits_unmerged_and_merged(name, kw, offsets, tmp_path):
    model = _randomize(create_video_model(name, 4, 5, head_offsets=offsets, **kw)).eval()
    x = _video(model)
    with torch.no_grad():
        want = model(x)
    model.save_pretrained(tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.config == model.config and not back.merged
    with torch.no_grad():
        assert torch.equal(back(x), want)
    # fine-tunable: the same parameters train as in the original
    assert {n for n, p in back.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}

    merged = merge_adapters(model).eval()
    merged.save_pretrained(tmp_path / "merged")
    for p in (tmp_path / "merged", tmp_path / "merged" / "model.safetensors",
              tmp_path / "merged" / "config.json"):
        m2 = load_model(p)
        assert m2.merged and m2.head_offsets == model.head_offsets
        with torch.no_grad():
            torch.testing.assert_close(m2(x), want, rtol=1e-5, atol=1e-5)
    # the backbone tensors load strict=True into vanilla timm built from the recorded config
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    from safetensors.torch import load_file
    vanilla = timm.create_model(cfg["model_name"], pretrained=False, num_classes=0,
                                **cfg["timm_kwargs"])
    tensors = load_file(str(tmp_path / "merged" / "model.safetensors"))
    vanilla.load_state_dict({k[len("backbone."):]: v for k, v in tensors.items()
                             if k.startswith("backbone.")}, strict=True)
    assert set(tensors) - {k for k in tensors if k.startswith("backbone.")} == \
        {"temporal_embedding", "head.weight", "head.bias"}
    if kw.get("qkv_bias") is False:  # the merge folded a bias into qkv and says so
        assert cfg["timm_kwargs"]["qkv_bias"] is True


def test_config_json_is_the_config_and_strict(tmp_path):
    model = create_video_model("vit_small_patch16_224", 4, 3, head_offsets="spatial",
                               img_size=32, depth=1, class_names=["a", "b", "c"])
    model.save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["model_name"] == "vit_small_patch16_224"
    assert doc["timm_kwargs"] == {"img_size": 32, "depth": 1}
    assert doc["head_offsets"] == [0] * 6 and doc["class_names"] == ["a", "b", "c"]
    assert doc["format"] == "zeroi2v" and doc["format_version"] == 3
    assert doc["artefact"]["weights"] == "full"
    assert load_model(tmp_path).class_names == ("a", "b", "c")
    doc.pop("artefact")
    assert ZeroI2VConfig.from_dict(doc) == model.config
    with pytest.raises(ValueError, match=r"unknown key 'num_frame' \(did you mean 'num_frames'\?\)"):
        ZeroI2VConfig.from_dict({**doc, "num_frame": 3})
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        ZeroI2VConfig.from_dict({**doc, "num_frames": "8"})
    with pytest.raises(ValueError, match="newer than this zeroi2v"):
        ZeroI2VConfig.from_dict({**doc, "format_version": 4})
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        ZeroI2VConfig.from_dict({**doc, "class_names": ["a", "b"]})
    with pytest.raises(ValueError, match="ambiguous"):
        create_video_model("vit_small_patch16_224", 4, 3, head_offsets=None, img_size=32)


def test_from_config_and_instances(tmp_path):
    cfg = ZeroI2VConfig("vit_small_patch16_224", num_frames=2, num_classes=4,
                        head_offsets=[1, -1, 0, 0, 0, 0], timm_kwargs={"img_size": 32, "depth": 1})
    m = ZeroI2VViT.from_config(cfg)
    assert m.config == cfg
    # an instance is copied, never modified, and its recipe recovered and verified
    vit = timm.create_model("vit_small_patch16_224", img_size=48, depth=2, num_classes=10)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    video = create_video_model(vit, 2, 4, head_offsets="spatial")
    assert vit.num_classes == 10 and type(vit.blocks[0]).__name__ == "Block"
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert video.config.timm_kwargs == {"img_size": [48, 48], "depth": 2}
    video.save_pretrained(tmp_path / "inst")
    x = _video(video, b=1)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "inst")(x), video.eval()(x))
    # a model built with a class-valued kwarg works but says why it cannot be saved
    odd = create_video_model("vit_small_patch16_224", 2, 4, head_offsets="spatial", img_size=32,
                             depth=1, act_layer=torch.nn.SiLU)
    with pytest.raises(ValueError, match="cannot save.*JSON values"):
        odd.save_pretrained(tmp_path / "odd")
    assert not (tmp_path / "odd").exists()


def test_trainable_weights_need_their_base(tmp_path):
    m = create_video_model("vit_small_patch16_224", 2, 3, head_offsets="spatial", img_size=32,
                           depth=1)
    with pytest.raises(ValueError, match="needs base_weights"):
        m.save_pretrained(tmp_path / "x", weights="trainable")
    base = tmp_path / "base.pth"
    torch.save(m.backbone.state_dict(), base)
    m.save_pretrained(tmp_path / "part", weights="trainable", base_weights=base)
    base.unlink()
    with pytest.raises(FileNotFoundError, match="only the trainable tensors.*--pretrained"):
        load_model(tmp_path / "part")


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    m = create_video_model("vit_small_patch16_224", 2, 3, head_offsets="spatial", img_size=32,
                           depth=1)
    m.save_pretrained(d / "a")
    create_video_model("vit_small_patch16_224", 2, 7, head_offsets="spatial", img_size=32,
                       depth=1).save_pretrained(d / "b")
    return d


def test_bad_files_are_one_clear_error(saved, tmp_path):
    import shutil

    cases = {}
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    cases["random.bin"] = "not a zeroi2v model"
    shutil.copytree(saved / "a", tmp_path / "trunc")
    w = tmp_path / "trunc" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    cases["trunc"] = "not a readable safetensors file"
    (tmp_path / "empty").mkdir()
    cases["empty"] = "holds no zeroi2v model"
    shutil.copytree(saved / "a", tmp_path / "newer")
    doc = json.loads((tmp_path / "newer" / "config.json").read_text())
    (tmp_path / "newer" / "config.json").write_text(json.dumps({**doc, "format_version": 9}))
    cases["newer"] = "format version 9, newer than this zeroi2v"
    shutil.copytree(saved / "a", tmp_path / "mixed")  # weights of a 7-class model, 3-class config
    shutil.copy(saved / "b" / "model.safetensors", tmp_path / "mixed" / "model.safetensors")
    cases["mixed"] = "belong to different saves"
    # weights that do not fit their config (and the metadata copy agreeing with the config)
    from safetensors.torch import load_file, save_file
    shutil.copytree(saved / "a", tmp_path / "misfit")
    t = load_file(str(tmp_path / "misfit" / "model.safetensors"))
    t["head.weight"] = torch.zeros(3, 5)
    from safetensors import safe_open
    with safe_open(str(saved / "a" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file(t, str(tmp_path / "misfit" / "model.safetensors"), metadata=meta)
    cases["misfit"] = r"key 'head\.weight' has shape \(3, 5\) in the file, the model expects \(3, 384\)"
    for name, msg in cases.items():
        with pytest.raises(ValueError, match=msg):
            load_model(tmp_path / name)
    for name in cases:
        assert main(["predict", str(tmp_path / name), "nothing.mp4"]) == 2


def test_pre_release_files_are_refused_in_one_line(saved, tmp_path, capsys):
    """zeroi2v 0.1's pickles and format-2 folders were never released: no converter, one line."""
    old = tmp_path / "last.pth"
    torch.save({"format": "zeroi2v-train", "version": 1, "model": {"w": torch.zeros(2)}}, old)
    with pytest.raises(ValueError, match="is not a zeroi2v model"):
        load_model(old)
    import shutil
    shutil.copytree(saved / "a", tmp_path / "v2")
    doc = json.loads((tmp_path / "v2" / "config.json").read_text())
    (tmp_path / "v2" / "config.json").write_text(json.dumps({**doc, "format_version": 2}))
    with pytest.raises(ValueError, match="format version 2, written by a pre-release zeroi2v"):
        load_model(tmp_path / "v2")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "v2"), "v.mp4"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- nothing runs


class _Evil:
    """Unpickling this creates ``path`` (what a hostile checkpoint would do, harmlessly)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_files(tmp_path, sentinel):
    files = {}
    files["bare.pth"] = _Evil(sentinel)
    files["wrapped.pth"] = {"state_dict": {"w": torch.zeros(2)}, "meta": _Evil(sentinel)}
    files["framework.pth"] = {"format": "mmengine", "meta": {"cfg": _Evil(sentinel)},
                              "state_dict": {"x": torch.zeros(2)}}
    paths = {}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        paths[name] = tmp_path / name
    # a TorchScript-looking archive whose data.pkl carries the payload
    import pickle
    ts = tmp_path / "archive.pt"
    with zipfile.ZipFile(ts, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Evil(sentinel)))
        z.writestr("archive/constants.pkl", pickle.dumps(()))
    paths["archive.pt"] = ts
    return paths


def test_malicious_pickles_run_nothing_anywhere(tmp_path, saved):
    import shutil

    from zeroi2v.interop import load_clip_weights, load_official_checkpoint
    from zeroi2v.safe_io import read_state_dict
    from zeroi2v.train.checkpoint import read_training_checkpoint

    sentinel = tmp_path / "PWNED"
    paths = _evil_files(tmp_path, sentinel)
    # a saved model folder whose training state is hostile
    shutil.copytree(saved / "a", tmp_path / "ckpt")
    torch.save({"format": "zeroi2v-training-state", "x": _Evil(sentinel)},
               tmp_path / "ckpt" / "training_state.pt")
    from zeroi2v.data import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", num_classes=2, videos_per_class=2,
                                  num_frames=4, size=32, seed=0, val_fraction=0.5)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "model: {name: vit_small_patch16_224, timm_kwargs: {img_size: 32, depth: 1}, "
        "num_frames: 2, head_offsets: spatial}\n"
        f"data: {{root: {data['root']}, train_ann: {data['train']}, sampling: uniform, size: 32, "
        "short_side: 32, rand_augment: null, num_workers: 0}\n"
        "train: {epochs: 1, batch_size: 1, progress: false}\n")
    for name, p in paths.items():
        for fn in (read_checkpoint, read_state_dict):  # may succeed: the payload is inert
            try:
                fn(p)
            except ValueError:
                pass
        for fn in (load_model,
                   load_official_checkpoint,
                   lambda q: load_clip_weights("vit_small_patch16_224", q, img_size=32, depth=1),
                   lambda q: create_video_model("vit_small_patch16_224", 2, 3, img_size=32,
                                                depth=1, head_offsets="spatial",
                                                pretrained_file=q)):
            with pytest.raises((ValueError, TypeError)):
                fn(p)
        for argv in (["eval", str(p), "--ann", "a.txt"], ["predict", str(p), "v.mp4"],
                     ["merge", str(p), "--out", str(tmp_path / "o1")],
                     ["export", str(p), "--out", str(tmp_path / "o.onnx")],
                     ["import-official", str(p), "--out", str(tmp_path / "o2")],
                     ["train", str(cfg), "--pretrained", str(p), "--out", str(tmp_path / "r")]):
            assert main(argv) == 2, (name, argv)
        assert not sentinel.exists(), name
    with pytest.raises(ValueError, match="cannot be read as a training state"):
        read_training_checkpoint(tmp_path / "ckpt")
    assert main(["train", str(cfg), "--resume", str(tmp_path / "ckpt"), "--out",
                 str(tmp_path / "r2")]) == 2
    assert not sentinel.exists()
    for d in ("o1", "o2"):
        assert not (tmp_path / d).exists()
