"""The Hugging Face Hub, without a network: image weights by timm name (``pretrained=True``),
models by ``hf-hub:ORG/NAME``, ``push_to_hub`` and hub files for ``import-official``.

Every test lays out a Hub cache as ``huggingface_hub`` writes it (``models--ORG--NAME/refs/main``,
``snapshots/<commit>/<file>`` linking into ``blobs/``) in a temporary folder, with random
weights, and runs with ``HF_HUB_OFFLINE=1``, so nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from _helpers import TINY_VIT
from zeroi2v import create_video_model, load_model, merge_adapters
from zeroi2v.cli import main

CLIP = "vit_base_patch16_clip_224"
TAG = f"{CLIP}.openai"
CLIP_REPO = "timm/vit_base_patch16_clip_224.openai"  # timm's hf_hub_id for the tag
ROOT = Path(__file__).resolve().parents[1]


def add_to_cache(cache: Path, repo_id: str, files: dict, *, ref: str = "main") -> str:
    """Put ``files`` ({path in repo: bytes}) into the Hub cache ``cache`` as one commit of
    ``repo_id`` that ``ref`` points at, as ``hf_hub_download`` leaves them; returns the commit."""
    commit = hashlib.sha1(b"".join(k.encode() + v for k, v in sorted(files.items()))).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()  # LFS blobs: their SHA-256
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline: the environment a user sets, and huggingface_hub's
    constants (read when it is imported, which happened before this test)."""
    from huggingface_hub import constants

    root = tmp_path / "hf"
    hub = root / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def _bytes(tensors: dict, tmp_path: Path, name="w.safetensors") -> bytes:
    p = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(p))
    return p.read_bytes()


def _image_weights(seed=0) -> dict:
    """What timm publishes for the tag, at TINY_VIT size: a CLIP ViT with its 512-wide head."""
    torch.manual_seed(seed)
    vit = timm.create_model(CLIP, num_classes=512, **TINY_VIT)
    return {k: v + 0.01 * torch.randn_like(v) for k, v in vit.state_dict().items()}


def _tiny_video(**kw):
    torch.manual_seed(1)
    return create_video_model("vit_base_patch16_224", num_frames=2, num_classes=3,
                              head_offsets=[1, -1, 0, 0], **TINY_VIT, **kw).eval()


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- image weights


def test_pretrained_true_loads_exactly_the_cached_weights(cache, tmp_path):
    sd = _image_weights()
    data = _bytes(sd, tmp_path)
    commit = add_to_cache(cache, CLIP_REPO, {"model.safetensors": data})
    model = create_video_model(TAG, num_frames=2, num_classes=3, pretrained=True, **TINY_VIT)
    own = model.backbone.state_dict()
    loaded = [k for k in sd if not k.startswith("head.")]
    assert loaded and all(torch.equal(own[k], sd[k]) for k in loaded)
    src = model.config.pretrained_source
    assert src == {"timm_name": TAG, "repo_id": CLIP_REPO, "filename": "model.safetensors",
                   "revision": commit, "sha256": hashlib.sha256(data).hexdigest(),
                   "size": len(data)}
    # the source survives saving, loading and merging
    model.save_pretrained(tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc["pretrained_source"] == src and doc["model_name"] == TAG
    assert load_model(tmp_path / "m").config.pretrained_source == src
    assert merge_adapters(model).config.pretrained_source == src


def test_pretrained_true_reads_a_pickle_only_through_the_restricted_reader(cache, tmp_path):
    """A repository without a safetensors copy: the .bin is read by zeroi2v's reader, so an
    object in it that would run code on unpickling stays inert."""
    sentinel = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    sd = _image_weights(seed=3)
    torch.save({"state_dict": sd, "trap": Evil()}, tmp_path / "p.bin")
    add_to_cache(cache, CLIP_REPO, {"pytorch_model.bin": (tmp_path / "p.bin").read_bytes()})
    model = create_video_model(TAG, num_frames=2, num_classes=3, pretrained=True, **TINY_VIT)
    assert not sentinel.exists()
    assert torch.equal(model.backbone.state_dict()["cls_token"], sd["cls_token"])
    assert model.config.pretrained_source["filename"] == "pytorch_model.bin"


def test_pretrained_file_header_is_checked_before_loading(cache, tmp_path):
    """A cached file whose header claims a tensor of 4 TB is refused from the header alone."""
    header = json.dumps({"pos_embed": {"dtype": "F32", "shape": [10**6, 10**6],
                                       "data_offsets": [0, 4 * 10**12]}}).encode()
    data = len(header).to_bytes(8, "little") + header + b"\0" * 64
    add_to_cache(cache, CLIP_REPO, {"model.safetensors": data})
    with pytest.raises(ValueError, match="not a readable safetensors file: tensor 'pos_embed'"):
        create_video_model(TAG, num_frames=2, num_classes=3, pretrained=True, **TINY_VIT)


def test_pretrained_offline_without_cache_is_one_line(cache, tmp_path, capsys):
    with pytest.raises(FileNotFoundError) as e:
        create_video_model(TAG, num_frames=2, num_classes=3, pretrained=True, **TINY_VIT)
    msg = str(e.value)
    assert f"{CLIP_REPO}/model.safetensors is not in the Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE=1" in msg and f"hf download {CLIP_REPO} model.safetensors" in msg
    # the same from a run config, before anything is written
    from _helpers import write

    cfg = {"model": {"name": TAG, "pretrained": True, "timm_kwargs": TINY_VIT},
           "data": {"train_ann": str(tmp_path / "a.txt"), "root": str(tmp_path), "size": 16},
           "train": {"out_dir": str(tmp_path / "run")}}
    (tmp_path / "a.txt").write_text("v.mp4 0\n")
    (tmp_path / "v.mp4").write_bytes(b"")  # only looked for, never decoded, before the check
    assert main(["train", write(tmp_path / "c.yaml", cfg)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "model.pretrained" in line and "not in the Hugging Face cache" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,says", [
    (CLIP, "has no tag naming its weights: use vit_base_patch16_clip_224.<tag>"),
    (f"{CLIP}.nope", "no vit_base_patch16_clip_224 weights tagged 'nope'"),
])
def test_pretrained_names_the_weights(cache, name, says):
    """The tag is required (timm's default tag is not always the weights one expects)."""
    with pytest.raises(ValueError, match=says) as e:
        create_video_model(name, num_frames=2, num_classes=3, pretrained=True, **TINY_VIT)
    assert "openai" in str(e.value)


def test_pretrained_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="pretrained_file="):
        create_video_model(TAG, num_frames=2, num_classes=3, pretrained="x.pth", **TINY_VIT)
    with pytest.raises(ValueError, match="not both"):
        create_video_model(TAG, num_frames=2, num_classes=3, pretrained=True,
                           pretrained_file="x.pth", **TINY_VIT)


def test_run_config_pretrained_true_and_trainable_checkpoints(cache, tmp_path):
    """``model.pretrained: true`` builds the run's model from the cached weights, and a
    trainable-only checkpoint of it finds its frozen weights again through the cache (by
    repository, commit and SHA-256) when the recorded path is gone."""
    from zeroi2v.models.artefact import read_artefact
    from zeroi2v.train.build import build_model
    from zeroi2v.train.checkpoint import base_weights_digest
    from zeroi2v.train.config import load_config

    sd = _image_weights(seed=5)
    commit = add_to_cache(cache, CLIP_REPO, {"model.safetensors": _bytes(sd, tmp_path)})
    cfg = load_config(None, [f"model.name={TAG}", "model.pretrained=true",
                             f"model.timm_kwargs={json.dumps(TINY_VIT)}", "model.num_frames=2"])
    assert cfg.model.pretrained is True
    model = build_model(cfg.model, 3).eval()
    assert torch.equal(model.backbone.state_dict()["pos_embed"], sd["pos_embed"])
    base = base_weights_digest(True, model.config.pretrained_source)
    assert base["repo_id"] == CLIP_REPO and base["revision"] == commit
    with torch.no_grad():
        model.head.weight.normal_()
    model.save_pretrained(tmp_path / "ckpt", weights="trainable",
                          base_weights=dict(base, path=str(tmp_path / "gone.safetensors")))
    assert read_artefact(tmp_path / "ckpt").weights == "trainable"
    x = torch.randn(1, 3, 2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ckpt")(x), model(x), rtol=0, atol=0)


def test_a_run_from_hub_weights_saves_trainable_checkpoints_that_name_them(cache, tmp_path):
    """``model.pretrained: true`` end to end: the run trains from the cached weights, its
    trainable-only checkpoints record the Hub file, and resuming checks it."""
    from test_train import ColourVideos, tiny_cfg
    from zeroi2v.models.artefact import read_artefact
    from zeroi2v.train.engine import train

    sd = _image_weights(seed=7)
    commit = add_to_cache(cache, CLIP_REPO, {"model.safetensors": _bytes(sd, tmp_path)})
    over = {"model.name": TAG, "model.pretrained": "true", "train.save_full": "false",
            "data.size": 16}
    ds, val = ColourVideos(n=8), ColourVideos(n=4, seed=1)
    res = train(tiny_cfg(tmp_path / "run", **over, **{"train.epochs": 1}),
                datasets={"train": ds, "val": val})
    assert torch.equal(res["model"].backbone.state_dict()["pos_embed"], sd["pos_embed"])
    art = read_artefact(tmp_path / "run" / "last")
    assert art.weights == "trainable"
    assert (art.base_weights["repo_id"], art.base_weights["revision"]) == (CLIP_REPO, commit)
    assert art.config.pretrained_source["revision"] == commit
    res2 = train(tiny_cfg(tmp_path / "run", **over, **{"train.epochs": 2}), resume="auto",
                 datasets={"train": ds, "val": val})
    assert res2["epoch"] == 2


# ----------------------------------------------------------------------------- models


def _publish(cache: Path, model, tmp_path: Path, repo="someone/tiny-zeroi2v", ref="main",
             **kw) -> str:
    folder = tmp_path / f"pub_{repo.replace('/', '_')}_{ref}"
    model.save_pretrained(folder, **kw)
    return add_to_cache(cache, repo, {p.name: p.read_bytes() for p in folder.iterdir()}, ref=ref)


def test_load_model_from_the_hub_cache_gives_the_saved_logits(cache, tmp_path):
    model = _tiny_video()
    commit = _publish(cache, model, tmp_path)
    x = torch.randn(2, 3, 2, 16, 16)
    with torch.no_grad():
        want = model(x)
        for ref in ("hf-hub:someone/tiny-zeroi2v", f"hf-hub:someone/tiny-zeroi2v@{commit}"):
            torch.testing.assert_close(load_model(ref)(x), want, rtol=0, atol=0)
    # a branch is a revision too
    other = _tiny_video(adapter_scale=1.0)
    with torch.no_grad():
        other.head.bias.fill_(3.0)
    _publish(cache, other, tmp_path, ref="v2")
    with torch.no_grad():
        torch.testing.assert_close(load_model("hf-hub:someone/tiny-zeroi2v@v2")(x), other(x),
                                   rtol=0, atol=0)


def test_a_hub_model_gets_the_checks_of_a_folder(cache, tmp_path):
    """One flipped byte in the cached weights is found by the SHA-256 config.json records."""
    _publish(cache, _tiny_video(), tmp_path)
    blob = next(p for p in (cache / "models--someone--tiny-zeroi2v" / "blobs").iterdir()
                if p.stat().st_size > 4096)
    data = bytearray(blob.read_bytes())
    data[-3] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged: its SHA-256 differs"):
        load_model("hf-hub:someone/tiny-zeroi2v")


def test_a_repository_that_is_not_a_zeroi2v_model(cache, tmp_path):
    add_to_cache(cache, CLIP_REPO, {"config.json": b'{"architecture": "vit"}',
                                    "model.safetensors": _bytes(_image_weights(), tmp_path)})
    with pytest.raises(ValueError, match="is not a zeroi2v model"):
        load_model(f"hf-hub:{CLIP_REPO}")


@pytest.mark.parametrize("model_id", ["hf-hub:nobody/missing", "hf-hub:someone/tiny-zeroi2v@v9"])
def test_a_missing_hub_model_is_one_line(cache, tmp_path, capsys, model_id):
    _publish(cache, _tiny_video(), tmp_path)
    for cmd in (["predict", model_id, "v.mp4"], ["merge", model_id, "--out", str(tmp_path / "o")],
                ["export", model_id, "--out", str(tmp_path / "m.pt2")],
                ["eval", model_id, "--ann", "a.txt"]):
        assert main(cmd) == 2, cmd
        line = _one_line(capsys.readouterr().err)
        assert "is not in the Hugging Face cache" in line and "hf download" in line, line
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.pt2").exists()


def test_a_hub_id_that_does_not_exist_online_is_one_line(monkeypatch, capsys):
    """What the Hub answers for an unknown repository (404), without asking it."""
    import huggingface_hub
    from huggingface_hub.utils import RepositoryNotFoundError

    def not_found(repo_id, filename, **kw):
        # built without the HTTP response object, whose class depends on the hub's version
        err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(err, "404 Client Error.\n\nRepository Not Found")
        raise err

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    assert main(["predict", "hf-hub:nobody/nothing", "v.mp4"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "no repository 'nobody/nothing' on the Hub" in line


@pytest.mark.parametrize("bad", ["hf-hub:", "hf-hub:a/b/c", "hf-hub:a/b@..", "hf-hub:a/b:file"])
def test_malformed_hub_ids(bad):
    with pytest.raises(ValueError, match="hf-hub:"):
        load_model(bad)


def test_cli_merge_from_the_hub_offline_in_a_fresh_process(tmp_path):
    """The environment alone (HF_HUB_CACHE, HF_HUB_OFFLINE=1) is what a user sets."""
    cache = tmp_path / "hf" / "hub"
    commit = _publish(cache, _tiny_video(), tmp_path)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "zeroi2v.cli", "merge", "hf-hub:someone/tiny-zeroi2v",
                        "--out", str(tmp_path / "merged")], env=env, capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    art = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert art["merged"] and art["artefact"]["merged_from"] == \
        f"hf-hub:someone/tiny-zeroi2v@{commit}"


# ----------------------------------------------------------------------------- push


class RecordingApi:
    """Stands in for ``HfApi``: records the calls and keeps a copy of the uploaded folder."""

    def __init__(self, keep: Path):
        self.keep, self.calls = keep, []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        import shutil

        self.calls.append(("upload_folder", repo_id, kw))
        shutil.copytree(folder_path, self.keep)
        return "commit-info"


def test_push_to_hub_uploads_the_folder_and_a_card(cache, tmp_path):
    from zeroi2v.train.config import load_config

    model = _tiny_video()
    model.class_names = ["a", "b", "c"]
    run = load_config(None, ["data.root=/home/me/videos", "data.train_ann=/home/me/train.txt",
                             "train.out_dir=/home/me/runs/x", "train.epochs=7",
                             f"model.timm_kwargs={json.dumps(TINY_VIT)}"])
    results = {"top1": 81.25, "top5": 97.5, "mean_class_acc": 80.0, "num_samples": 16,
               "views": 3, "ann_file": "/home/me/val.txt", "merged": False}
    api = RecordingApi(tmp_path / "uploaded")
    assert model.push_to_hub("someone/tiny-zeroi2v", run_config=run, eval_results=results,
                             private=True, api=api) == "commit-info"
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][2]["private"] is True and api.calls[0][2]["exist_ok"] is True
    up = tmp_path / "uploaded"
    assert sorted(p.name for p in up.iterdir()) == ["README.md", "config.json",
                                                   "model.safetensors", "run_config.yaml"]
    card = (up / "README.md").read_text()
    for says in ('zeroi2v.load_model("hf-hub:someone/tiny-zeroi2v")', "| frames per clip | 2 |",
                 "| classes | 3: a, b, c |", "`[1, -1, 0, 0]`", "2 of 4 heads",
                 "kept (four per block", "7 epochs", "81.25", "97.50", "on `val.txt`",
                 "pipeline_tag: video-classification", "library_name: zeroi2v"):
        assert says in card, says
    assert "/home/me" not in card
    run_yaml = (up / "run_config.yaml").read_text()
    assert "/home/me" not in run_yaml and "epochs: 7" in run_yaml
    # what was uploaded loads from the Hub with the same logits
    commit = add_to_cache(cache, "someone/tiny-zeroi2v",
                          {p.name: p.read_bytes() for p in up.iterdir()})
    x = torch.randn(1, 3, 2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_model(f"hf-hub:someone/tiny-zeroi2v@{commit}")(x),
                                   model(x), rtol=0, atol=0)
    # eval/predict take the run's pipeline from the uploaded run_config.yaml
    from zeroi2v.train.build import load_model_and_run_config

    _, cfg, art = load_model_and_run_config(f"hf-hub:someone/tiny-zeroi2v@{commit}")
    assert art.run_config_file is not None and cfg.train.epochs == 7 and cfg.data.root is None


def test_push_a_merged_model_from_a_folder(tmp_path, cache):
    """A saved folder is loaded with every check; its card says merged and shows the plain
    timm load; the image weights' repository becomes the card's base model."""
    add_to_cache(cache, CLIP_REPO, {"model.safetensors": _bytes(_image_weights(), tmp_path)})
    model = create_video_model(TAG, num_frames=2, num_classes=3, pretrained=True, **TINY_VIT)
    merge_adapters(model).save_pretrained(tmp_path / "merged")
    api = RecordingApi(tmp_path / "up")
    from zeroi2v.models.hub_push import push_to_hub

    push_to_hub(tmp_path / "merged", "someone/merged", api=api, revision="v1")
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[2][2]["revision"] == "v1"
    card = (tmp_path / "up" / "README.md").read_text()
    assert "merged: folded into the frozen linears" in card
    assert f"base_model: {CLIP_REPO}" in card and "license: apache-2.0" in card
    assert "timm.create_model" in card and "Not recorded with this upload" in card
    assert not (tmp_path / "up" / "run_config.yaml").exists()


def test_cli_push_takes_the_run_config_and_eval_results_beside_the_model(tmp_path, monkeypatch,
                                                                         capsys):
    import huggingface_hub

    from zeroi2v.train.config import load_config

    folder = tmp_path / "best"
    _tiny_video().save_pretrained(folder, run_config=load_config(
        None, ["train.epochs=3", "data.val_ann=/home/me/val.txt"]))
    (folder / "eval.json").write_text(json.dumps({"top1": 55.5, "mean_class_acc": 50.0,
                                                  "num_samples": 8, "merged": False}))
    api = RecordingApi(tmp_path / "up")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    assert main(["push", str(folder), "someone/tiny", "--private", "--license", "mit"]) == 0
    assert 'zeroi2v.load_model("hf-hub:someone/tiny")' in capsys.readouterr().out
    card = (tmp_path / "up" / "README.md").read_text()
    assert "55.50" in card and "3 epochs" in card and "license: mit" in card
    assert "/home/me" not in (tmp_path / "up" / "run_config.yaml").read_text()
    assert api.calls[0][2]["private"] is True
    # results of another checkpoint (an older RUN/best) are left out, and that is said
    (folder / "eval.json").write_text(json.dumps({"top1": 55.5, "mean_class_acc": 50.0,
                                                  "num_samples": 8, "merged": False,
                                                  "checkpoint_folder": str(tmp_path / "old")}))
    api2 = RecordingApi(tmp_path / "up2")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api2)
    assert main(["push", str(folder), "someone/tiny2"]) == 0
    assert f"{folder / 'eval.json'} evaluated {tmp_path / 'old'}" in capsys.readouterr().out
    assert "55.50" not in (tmp_path / "up2" / "README.md").read_text()
    # a hand-edited results file: what is not of its type is left out of the card
    (folder / "eval.json").write_text(json.dumps({"top1": 55.5, "merged": [1], "ann_file": 5,
                                                  "num_samples": "many", "num_skipped": {}}))
    api3 = RecordingApi(tmp_path / "up3")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api3)
    assert main(["push", str(folder), "someone/tiny3"]) == 0
    card = (tmp_path / "up3" / "README.md").read_text()
    assert "55.50" in card and "many" not in card
    capsys.readouterr()
    # a model on the Hub is not pushed again from the cache
    assert main(["push", "hf-hub:someone/tiny", "someone/other"]) == 2
    assert "push a local model folder" in _one_line(capsys.readouterr().err)


def test_push_refuses_a_revision_in_the_id(tmp_path):
    with pytest.raises(ValueError, match="revision="):
        _tiny_video().push_to_hub("someone/x@v1", api=RecordingApi(tmp_path / "u"))


# ----------------------------------------------------------------------------- official files


def test_import_official_from_a_hub_file_and_merge(cache, tmp_path, capsys):
    from official_ckpt import make_official

    sd = make_official(64, 2, 4, 3)
    torch.save({"meta": {"epoch": 3}, "state_dict": sd}, tmp_path / "o.pth")
    commit = add_to_cache(cache, "authors/zeroi2v",
                          {"ckpts/k400/o.pth": (tmp_path / "o.pth").read_bytes()})
    out = tmp_path / "imported"
    spec = "hf-hub:authors/zeroi2v:ckpts/k400/o.pth"
    assert main(["import-official", spec, "--out", str(out), "--head-offsets", "1,-1,0,0",
                 "--merge"]) == 0
    assert "merged=True" in capsys.readouterr().out
    art = json.loads((out / "config.json").read_text())["artefact"]
    assert art["imported_from"] == f"hf-hub:authors/zeroi2v@{commit}:ckpts/k400/o.pth"
    assert art["imported_sha256"] == hashlib.sha256((tmp_path / "o.pth").read_bytes()).hexdigest()
    from zeroi2v.interop import load_official_checkpoint

    direct = load_official_checkpoint(tmp_path / "o.pth", head_offsets=[1, -1, 0, 0]).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(x), direct(x), rtol=1e-4, atol=1e-5)
    # a file that is not there
    assert main(["import-official", "hf-hub:authors/zeroi2v:ckpts/nope.pth", "--out",
                 str(tmp_path / "o2"), "--head-offsets", "1,-1,0,0"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "authors/zeroi2v/ckpts/nope.pth is not in the Hugging Face cache" in line
