"""Training/evaluation machinery: schedule, parameter groups, training, resume, metrics, checkpoints."""
import copy
import math
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from zeroi2v import create_video_model
from zeroi2v.safe_io import atomic_dir, atomic_torch_save
from zeroi2v.train.checkpoint import read_training_checkpoint
from zeroi2v.train.config import apply_overrides, load_config
from zeroi2v.train.engine import train
from zeroi2v.train.evaluation import evaluate, predict_probs
from zeroi2v.train.metrics import average_views, classification_metrics
from zeroi2v.train.optim import (
    build_optimizer,
    build_scheduler,
    param_groups,
    scaled_lr,
    warmup_cosine_factor,
)

TINY = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 4}


def tiny_model(num_frames=4, num_classes=3, **kw):
    return create_video_model("vit_base_patch16_224", num_frames, num_classes,
                              head_offsets=[1, -1, 0, 0], **TINY, **kw)


class ColourVideos(Dataset):
    """Tiny learnable videos: the class is which colour channel is bright (plus noise)."""

    def __init__(self, n=24, num_classes=3, frames=4, size=16, seed=0, views=None):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % num_classes
        self.videos = torch.randn(n, 3, frames, size, size, generator=g) * 0.5
        for i, y in enumerate(self.labels.tolist()):
            self.videos[i, y] += 1.0
        self.views = views
        self.num_classes = num_classes
        self.samples = [(f"v{i}.mp4", int(y)) for i, y in enumerate(self.labels)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        v = self.videos[i]
        if self.views:
            v = torch.stack([v + 0.1 * k for k in range(self.views)])
        return v, int(self.labels[i])


def tiny_cfg(tmp_path, **over):
    cfg = load_config(None, base={
        "model": {"name": "vit_base_patch16_224", "timm_kwargs": TINY, "num_frames": 4,
                  "head_offsets": [1, -1, 0, 0]},
        "data": {"num_workers": 0},
        "eval": {"interval": 1, "batch_size": 8},
        "train": {"epochs": 2, "batch_size": 4, "lr": 3e-3, "scale_lr": False,
                  "warmup_epochs": 0.5, "out_dir": str(tmp_path), "progress": False,
                  "log_interval": 2},
    })
    return apply_overrides(cfg, [f"{k}={v}" for k, v in over.items()])


# ----------------------------------------------------------------------------- schedule


def test_warmup_cosine_values():
    f = lambda it: warmup_cosine_factor(it, total=100, warmup=10, start_factor=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.55)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert f(32) == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))
    # min_lr floor and no warm-up
    assert warmup_cosine_factor(0, 10, 0) == 1.0
    assert warmup_cosine_factor(10, 10, 0, min_factor=0.2) == pytest.approx(0.2)


def test_scheduler_per_iteration_and_state():
    p = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sch = build_scheduler(opt, epochs=4, steps_per_epoch=5, warmup_epochs=1, start_factor=0.1)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(20):
        sch.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(1.0)
    assert lrs[20] == pytest.approx(0.0, abs=1e-12)
    assert all(a <= b for a, b in zip(lrs[:5], lrs[1:6]))
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(2, 2))], lr=1.0)
    sch2 = build_scheduler(opt2, epochs=4, steps_per_epoch=5, warmup_epochs=1)
    sd = copy.deepcopy(sch.state_dict())
    sd["last_step"] = 7
    sch2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[7])


def test_linear_lr_scaling():
    assert scaled_lr(3e-4, 64, 64) == pytest.approx(3e-4)
    assert scaled_lr(3e-4, 8, 64) == pytest.approx(3e-4 / 8)
    assert scaled_lr(3e-4, 128, 32) == pytest.approx(1.2e-3)
    assert scaled_lr(3e-4, 8, 64, enabled=False) == 3e-4


# ----------------------------------------------------------------------------- param groups


def test_param_groups_recipe():
    m = tiny_model()
    groups = {g["weight_decay"]: g["names"] for g in param_groups(m, 0.05)}
    decay, no_decay = set(groups[0.05]), set(groups[0.0])
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    assert "temporal_embedding" in no_decay
    assert "head.bias" in no_decay and "head.weight" in decay
    assert "backbone.norm.weight" in no_decay and "backbone.norm.bias" in no_decay
    assert "backbone.blocks.0.attn.qkv.adapter.fc1.weight" in decay
    assert "backbone.blocks.0.attn.qkv.adapter.fc1.bias" in no_decay
    assert "backbone.blocks.0.attn.qkv.weight" not in trainable  # frozen backbone
    assert "backbone.blocks.0.attn.qkv.bias" not in trainable


def test_param_groups_full_finetune():
    m = tiny_model()
    for p in m.parameters():
        p.requires_grad_(True)
    groups = {g["weight_decay"]: set(g["names"]) for g in param_groups(m, 0.05)}
    no_decay = groups[0.0]
    for n in ("backbone.pos_embed", "backbone.cls_token", "backbone.blocks.0.norm1.weight",
              "backbone.blocks.0.attn.qkv.bias"):
        assert n in no_decay
    assert "backbone.blocks.0.attn.qkv.weight" in groups[0.05]
    assert "backbone.patch_embed.proj.weight" in groups[0.05]
    opt = build_optimizer(m, 1e-3, 0.05)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))


# ----------------------------------------------------------------------------- metrics


def test_classification_metrics_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1],   # y=0 hit
                          [0.5, 0.4, 0.1],   # y=1 miss (2nd)
                          [0.1, 0.3, 0.6],   # y=2 hit
                          [0.2, 0.5, 0.3],   # y=2 miss (2nd)
                          [0.05, 0.15, 0.8]])  # y=0 miss (3rd)
    labels = torch.tensor([0, 1, 2, 2, 0])
    m = classification_metrics(probs, labels, topk=(1, 2, 5))
    assert m["top1"] == pytest.approx(40.0)
    assert m["top2"] == pytest.approx(80.0)
    assert "top5" not in m  # 3 classes: top-5 would be 100 % by construction
    # per class: class 0 1/2, class 1 0/1, class 2 1/2 -> mean 33.33
    assert m["mean_class_acc"] == pytest.approx(100 * (0.5 + 0 + 0.5) / 3)
    assert m["confusion_matrix"] == [[1, 0, 1], [1, 0, 0], [0, 1, 1]]


class LookupModel(nn.Module):
    """Logits are read from a table indexed by the mean pixel value (set per video/view)."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        key = x.mean(dim=(1, 2, 3, 4)).round().long()
        return self.table[key]


class ViewSet(Dataset):
    def __init__(self, keys, labels):
        self.keys, self.labels = keys, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        views = torch.stack([torch.full((3, 2, 4, 4), float(k)) for k in self.keys[i]])
        return views, self.labels[i]


def test_multiview_evaluation_averages_softmax():
    table = torch.tensor([[4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [0.0, 2.0, 0.0],
                          [1.0, 1.0, 0.0], [0.0, 0.0, 0.5]])
    keys = [(0, 1), (2, 3), (4, 5)]  # two views per video
    labels = [1, 1, 2]
    model = LookupModel(table)
    ds = ViewSet(keys, labels)
    out = evaluate(model, ds, batch_size=2, device=torch.device("cpu"), num_classes=3)
    # hand computation: average of the two views' softmax
    sm = table.softmax(-1)
    expect = torch.stack([(sm[a] + sm[b]) / 2 for a, b in keys])
    np.testing.assert_allclose(out["probs"], expect.numpy(), rtol=1e-6)
    pred = expect.argmax(-1).tolist()  # [0, 2? ...] computed, not assumed
    top1 = 100 * np.mean([p == y for p, y in zip(pred, labels)])
    assert out["top1"] == pytest.approx(top1)
    # video 0: view0 says class 0 strongly, view1 mildly class 1 -> averaged: class 0 (a miss)
    assert pred[0] == 0
    # logits averaging would differ from softmax averaging for video 1
    assert average_views(table[[2, 3]], 2).argmax().item() == expect[1].argmax().item()


# ----------------------------------------------------------------------------- training


def _val_loss(model, ds):
    model.eval()
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = torch.tensor([ds[i][1] for i in range(len(ds))])
        return nn.functional.cross_entropy(model(x), y).item()


def test_two_epoch_training_lowers_loss(tmp_path):
    torch.manual_seed(0)
    ds = ColourVideos(n=24)
    cfg = tiny_cfg(tmp_path, **{"train.epochs": 2, "train.lr": 1e-2})
    model = create_video_model("vit_base_patch16_224", 4, 3, head_offsets=[1, -1, 0, 0], **TINY)
    before = _val_loss(model, ds)
    res = train(cfg, datasets={"train": ds, "val": ColourVideos(n=12, seed=1)}, model=model)
    after = _val_loss(res["model"], ds)
    assert after < 0.9 * before, (before, after)
    assert res["epoch"] == 2 and res["step"] == 2 * 6
    # outputs: checkpoint, JSON-lines log with train/epoch records, eval report
    for f in ("config.json", "model.safetensors", "run_config.yaml", "training_state.pt"):
        assert (tmp_path / "last" / f).is_file(), f
    assert (tmp_path / "best").resolve() == (tmp_path / "last").resolve()  # val improved
    # older epochs pruned, but the one before `last`, kept to fall back to
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["epoch_0001", "epoch_0002"]
    import json
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    kinds = {r["type"] for r in recs}
    assert {"setup", "train", "epoch"} <= kinds
    ep = [r for r in recs if r["type"] == "epoch"]
    assert len(ep) == 2 and all("val" in r and "clips_per_s" in r for r in ep)
    assert ep[-1]["train_loss"] < ep[0]["train_loss"]
    for f in ("val_results.json", "val_results_confusion.png", "val_results_per_class.csv",
              "val_results_per_class.md"):
        assert (tmp_path / f).is_file(), f
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_matches_uninterrupted_run(tmp_path):
    """Interrupt after epoch 1, resume: bitwise the same parameters as one uninterrupted run
    (dropout on, shuffling, gradient accumulation: every RNG stream is restored)."""
    ds, val = ColourVideos(n=16), ColourVideos(n=6, seed=1)
    common = {"train.epochs": 3, "train.accum_steps": 2, "train.batch_size": 2,
              "model.head_dropout": 0.5, "model.adapter_dropout": 0.1, "train.clip_grad": 1.0}

    torch.manual_seed(123)
    full = train(tiny_cfg(tmp_path / "a", **common), datasets={"train": ds, "val": val})

    torch.manual_seed(123)
    part = train(tiny_cfg(tmp_path / "b", **common, **{"train.stop_after_epoch": 1}),
                 datasets={"train": ds, "val": val})
    assert part["epoch"] == 1
    torch.manual_seed(999)  # the resumed process starts from a different RNG state
    resumed = train(tiny_cfg(tmp_path / "b", **common), resume="auto",
                    datasets={"train": ds, "val": val})
    assert resumed["epoch"] == 3 and resumed["step"] == full["step"]
    a, b = _trainable(full["model"]), _trainable(resumed["model"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["train_loss"] == full["train_loss"]
    assert resumed["val"]["top1"] == full["val"]["top1"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_training_checkpoint(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk"):
        read_training_checkpoint(tmp_path / "junk")
    tiny_model().save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        read_training_checkpoint(tmp_path / "saved")
    # a training state carrying a pickled object is refused by the weights-only loader
    ck = tmp_path / "saved"

    import argparse

    torch.save({"format": "zeroi2v-training-state", "version": 1, "x": argparse.Namespace(a=1)},
               ck / "training_state.pt")
    with pytest.raises(ValueError, match="training_state.pt cannot be read"):
        read_training_checkpoint(ck)


def test_resume_refuses_another_model_and_missing_checkpoint(tmp_path):
    ds, val = ColourVideos(n=8), ColourVideos(n=4, seed=1)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(tiny_cfg(tmp_path / "none"), resume="auto", datasets={"train": ds, "val": val})
    train(tiny_cfg(tmp_path / "a", **{"train.epochs": 1}), datasets={"train": ds, "val": val})
    other = tiny_cfg(tmp_path / "a", **{"model.head_offsets": [0, 0, 1, -1]})
    with pytest.raises(ValueError, match="settings differ from it: model.head_offsets"):
        train(other, resume="auto", datasets={"train": ds, "val": val})


def test_atomic_writes_leave_no_partial_file(tmp_path):
    target = tmp_path / "ck.pt"
    atomic_torch_save({"x": 1}, target)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"x": Boom()}, target)
    assert torch.load(target, weights_only=True)["x"] == 1  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("crash")
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]  # no folder, no temporary


def test_trainable_only_checkpoint_is_small(tmp_path):
    from safetensors.torch import load_file

    from zeroi2v import load_model

    m = tiny_model()
    base = tmp_path / "image.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in m.backbone.state_dict().items()
               if "adapter" not in k}, str(base))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "part", weights="trainable", base_weights=base)
    m.save_pretrained(tmp_path / "full")
    part = load_file(str(tmp_path / "part" / "model.safetensors"))
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert set(part) < set(full)
    assert "backbone.blocks.0.attn.qkv.weight" not in part
    x = torch.randn(1, 3, 4, 16, 16)
    with torch.no_grad():
        want = m.eval()(x)
        assert torch.equal(load_model(tmp_path / "part")(x), want)
    # another base file is detected, not silently used
    other = tmp_path / "other.safetensors"
    save_file({k: torch.randn_like(v) for k, v in load_file(str(base)).items()}, str(other))
    with pytest.raises(ValueError, match="not the pretrained file"):
        load_model(tmp_path / "part", pretrained=other)


def test_predict_probs_single_view_shape():
    model = tiny_model().eval()
    ds = ColourVideos(n=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    probs, labels = predict_probs(model, loader, torch.device("cpu"))
    assert probs.shape == (5, 3) and labels.tolist() == ds.labels.tolist()
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
