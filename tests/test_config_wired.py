"""Every key of the run config reaches what it controls (issue #22).

For each key of the schema the test sets a value other than the base config's and looks for a
difference in what is *built* (model, datasets and their transforms and samplers, loader,
optimiser, schedule, loss, precision) or, for the keys the loop reads, in what a short run
*does* (its log, its files, its console, the calls it makes). A key that validates and is
printed by ``zeroi2v config`` but changes nothing fails here: this is the test that caught
``eval.short_side``. A new key without an entry in ``CHANGES`` fails too.
"""
from __future__ import annotations

import hashlib
import shutil

import pytest
import timm
import torch

import zeroi2v.train.engine as engine
import zeroi2v.train.run as run_mod
from _helpers import TINY_VIT, cfg_dict
from zeroi2v.train import config as C
from zeroi2v.train import dist as zdist

# the functions the recorders below wrap (taken once: a recorder must never wrap another)
REAL = {"amp": run_mod.amp_dtype, "pin": run_mod.pin_memory_for, "eval": engine.evaluate,
        "clip": torch.nn.utils.clip_grad_norm_}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from zeroi2v.data import make_synthetic_dataset

    base = tmp_path_factory.mktemp("wired")
    ds = make_synthetic_dataset(base / "syn", num_classes=2, videos_per_class=4, num_frames=8,
                                size=16, seed=0, val_fraction=0.5)
    alt_root = base / "alt_root"
    alt_root.symlink_to(ds["root"], target_is_directory=True)
    for key in ("train", "val"):
        shutil.copy(ds[key], base / f"alt_{key}.txt")
    # the data's classes and one it lacks (the data's list must begin data.class_names); not
    # named classes.txt, which would be alt_train.txt's own list
    (base / "names.txt").write_text("\n".join(ds["classes"] + ["still"]) + "\n")
    from zeroi2v.data import pack_shards

    shards = pack_shards(ds["train"], ds["root"], base / "shards")["index"]
    img = timm.create_model("vit_base_patch16_224", num_classes=0, **TINY_VIT)
    torch.save(img.state_dict(), base / "image.pth")
    return dict(ds, alt_root=str(alt_root), alt_train=str(base / "alt_train.txt"),
                alt_val=str(base / "alt_val.txt"), classes=str(base / "names.txt"),
                image=str(base / "image.pth"), base=base, shards=shards)


def _base(files) -> dict:
    return cfg_dict(files, train={"epochs": 2, "log_interval": 1})


# key -> (value, changes to the base that make the key matter), or a callable of the files
CHANGES = {
    "model.name": ("deit_tiny_patch16_224", {}),
    "model.pretrained": (lambda f: f["image"], {}),
    "model.timm_kwargs": (dict(TINY_VIT, depth=2), {}),
    "model.num_frames": (2, {}),
    "model.head_offsets": ([0, 0, 1, -1], {}),
    "model.adapter_ratio": (0.5, {}),
    "model.adapter_scale": (1.0, {}),
    "model.adapter_dropout": (0.3, {}),
    "model.head_dropout": (0.2, {}),
    "model.train_backbone": (True, {}),
    "model.num_classes": (5, {}),
    "data.root": (lambda f: f["alt_root"], {}),
    "data.train_ann": (lambda f: f["alt_train"], {}),
    "data.val_ann": (lambda f: f["alt_val"], {}),
    "data.test_ann": (lambda f: f["alt_val"], {}),
    "data.val_root": (lambda f: f["alt_root"], {}),
    "data.class_names": (lambda f: f["classes"], {}),
    "data.sampling": ("dense", {}),
    "data.frame_interval": (2, {"data.sampling": "dense"}),
    "data.train_clips": (2, {}),
    "data.size": (32, {}),
    "data.short_side": (24, {}),
    "data.rand_augment": ([3, 1], {}),
    "data.random_erasing": (0.25, {}),
    "data.flip": (False, {}),
    "data.flip_label_map": ({0: 1}, {}),
    "data.on_error": ("drop", {}),
    "data.decoder": ("pyav", {}),
    "data.num_workers": (1, {}),
    "data.pin_memory": (False, {}),
    "data.shuffle_buffer": (2, {"data.train_ann": lambda f: f["shards"]}),  # training over shards
    "eval.num_clips": (2, {}),
    "eval.num_crops": (3, {}),
    "eval.short_side": (24, {}),
    "eval.batch_size": (2, {}),
    "eval.interval": (0, {}),
    "train.epochs": (3, {}),
    "train.batch_size": (1, {}),
    "train.lr": (2e-3, {}),
    "train.ref_batch_size": (32, {"train.scale_lr": True}),
    "train.scale_lr": (True, {}),
    "train.weight_decay": (0.1, {}),
    "train.betas": ([0.8, 0.99], {}),
    "train.eps": (1e-6, {}),
    "train.warmup_epochs": (1.0, {}),
    "train.warmup_start_factor": (0.5, {}),
    "train.min_lr": (1e-5, {}),
    "train.label_smoothing": (0.1, {}),
    "train.accum_steps": (2, {}),
    "train.clip_grad": (0.01, {}),
    "train.amp": ("bf16", {}),
    "train.seed": (5, {}),
    "train.deterministic": (True, {}),
    "train.log_interval": (3, {}),
    "train.out_dir": (lambda f: str(f["base"] / "elsewhere"), {}),  # the run goes there
    "train.save_full": (True, {"model.pretrained": lambda f: f["image"]}),  # auto: trainable
    "train.stop_after_epoch": (1, {}),
    "train.progress": (True, {}),
    "train.tensorboard": (True, {}),
}
#: Keys the training loop reads while it runs: observed in a short run, not in what is built.
RUNTIME = {"eval.batch_size", "eval.interval", "train.clip_grad", "train.log_interval",
           "train.out_dir", "train.stop_after_epoch", "train.progress", "train.tensorboard"}


def test_every_key_has_a_change():
    assert set(CHANGES) == set(C.all_keys()), (
        "keys without an entry in CHANGES (add one that shows the key's effect, or remove the "
        f"key): {sorted(set(C.all_keys()) - set(CHANGES))}; stale entries: "
        f"{sorted(set(CHANGES) - set(C.all_keys()))}")


def _config(files, tmp_path, key, with_value: bool):
    """The base config, with the changes that make ``key`` matter and, if ``with_value``, the
    key's own new value."""
    cfg = _base(files)
    cfg["train"]["out_dir"] = str(tmp_path / "out")
    value, extra = CHANGES[key]
    changes = {**extra, key: value} if with_value else dict(extra)
    for k, v in changes.items():
        sec, name = k.split(".")
        cfg[sec][name] = v(files) if callable(v) else v
    return C.load_config(None, base=cfg)


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _dataset(ds) -> tuple:
    if ds is None:
        return None
    if hasattr(ds, "plan"):  # a training stream over shards: the order of its first epochs
        return (tuple(tuple(ds.plan(e).tolist()) for e in range(4)), _dataset(ds.videos))
    return (ds.ann_file, repr(ds.sampler), repr(ds.transform), tuple(ds.samples), ds.num_classes,
            ds.decoder, ds.on_error, ds.flip_label_map, ds.seed)


def _built(cfg, monkeypatch) -> dict:
    """What set-up builds from ``cfg``, and what it asked of the device-dependent helpers."""
    from zeroi2v.train.build import test_annotations

    calls = {"amp": [], "pin": []}
    monkeypatch.setattr(run_mod, "amp_dtype",
                        lambda mode, dev: calls["amp"].append(mode) or REAL["amp"](mode, dev))
    monkeypatch.setattr(run_mod, "pin_memory_for",
                        lambda flag, dev: calls["pin"].append(flag) or REAL["pin"](flag, dev))
    torch.manual_seed(0)  # the same initialisation for every key
    det = torch.are_deterministic_algorithms_enabled()
    try:
        run, _ = run_mod.start_run(cfg, zdist.init_distributed(), None, None, None,
                                   overwrite=True, changes=[])
        deterministic = torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(det)
    sched = run.scheduler
    return {
        "model": repr(run.model.config), "weights": _weights_digest(run.model),
        "trainable": sorted(n for n, p in run.model.named_parameters() if p.requires_grad),
        "train_ds": _dataset(run.train_ds), "val_ds": _dataset(run.val_ds),
        "loader": (run.loader.batch_size, run.loader.num_workers), "sampler_seed": run.sampler.seed,
        "optimizer": [{k: v for k, v in g.items() if k not in ("params", "names", "lr",
                                                              "initial_lr")}
                      for g in run.optimizer.param_groups],
        "lr": run.lr, "schedule": [sched.lr_at(i) for i in range(0, sched.total_steps + 1)],
        "steps": run.steps_per_epoch, "loss": run.criterion.label_smoothing,
        "full_save": run.full_save, "classes": (run.num_classes, run.class_names),
        "calls": calls, "deterministic": deterministic, "test_ann": test_annotations(cfg),
    }


def _ran(cfg, monkeypatch, capsys) -> dict:
    """What a short run does with ``cfg``: its records, files, console lines and calls."""
    import json
    from pathlib import Path

    calls = {"eval_batch": [], "clip": []}

    def evaluate(model, ds, batch_size, *a, **k):
        calls["eval_batch"].append(batch_size)
        return REAL["eval"](model, ds, batch_size, *a, **k)

    monkeypatch.setattr(engine, "evaluate", evaluate)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda ps, norm, *a, **k: calls["clip"].append(norm) or
                        REAL["clip"](ps, norm, *a, **k))
    capsys.readouterr()
    engine.train(cfg, overwrite=True)
    out = Path(cfg.train.out_dir)
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return {
        "records": [(r["type"], r.get("epoch"), r.get("step"), "val" in r) for r in recs
                    if r["type"] in ("train", "epoch")],
        "files": sorted(p.name for p in out.iterdir()), "out": out.name,
        "console": len(capsys.readouterr().out.splitlines()), "calls": calls,
    }


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_the_key_changes_what_is_built_or_done(key, files, tmp_path, monkeypatch, capsys):
    if key == "train.tensorboard":
        pytest.importorskip("tensorboard", reason="train.tensorboard needs the tensorboard "
                                                  "package: pip install 'zeroi2v[tensorboard]'")
    observe = _ran if key in RUNTIME else _built
    args = (monkeypatch, capsys) if key in RUNTIME else (monkeypatch,)
    base = observe(_config(files, tmp_path / "base", key, with_value=False), *args)
    changed = observe(_config(files, tmp_path / "changed", key, with_value=True), *args)
    differ = [k for k in base if base[k] != changed[k] and not (k == "out" and
                                                                 key != "train.out_dir")]
    assert differ, f"{key}: changing it changed nothing that was built or done"
