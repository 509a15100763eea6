"""``zeroi2v demo``: an offline, CPU-sized end-to-end run of the method.

1. Generate the synthetic temporal-order dataset (real mp4 files; classes differ only in frame order,
   see :mod:`zeroi2v.data.synthetic`).
2. Train the same small timm ViT twice with identical settings except the head offsets:
   image-only (every offset 0) and STDHA (some heads read the neighbouring frame).
3. Merge the STDHA model's adapters, check merged == unmerged, evaluate both.
4. Report accuracy, parameter counts (unmerged, merged, plain ViT), the merged-vs-unmerged error
   and the throughput of the merged model vs the plain timm ViT on the same frames.

Both runs use the paper's recipe: the (here randomly initialised, since no pretrained image model
exists offline) backbone is frozen; adapters, temporal embedding, final norm and head are trained.
``--train-backbone`` fine-tunes everything instead. The image-only model sees exactly the same
multiset of frames in every class (and the same per-frame-index statistics), so it stays at chance
however long it trains; STDHA's temporal heads see how consecutive frames relate and reach
90+ % top-1 (measured numbers in the README).
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from ..data.dataset import symmetric_label_map
from ..models.merge import merge_adapters, merged_vs_unmerged_error
from ..models.video_vit import count_params, image_model_params
from .config import load_config
from .engine import train
from .evaluation import evaluate, summary, write_eval_report

#: The recipe the demo runs: the CPU-sized example config (configs/tiny_cpu.yaml is this file),
#: with what the demo changes in it below.
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
DEMO = {  # the paper's frozen backbone; datasets come from the demo, not annotation files
    "model": {"train_backbone": False},
    "data": {"root": None, "train_ann": None, "val_ann": None, "class_names": None},
    "eval": {"interval": 0},
    "train": {"epochs": 30, "log_interval": 10, "save_full": True},
}
QUICK = {  # --quick: a smaller model and run (tests)
    "model": {"timm_kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1,
                              "num_heads": 4}},
    "data": {"size": 32, "short_side": 32},
    "train": {"epochs": 2, "batch_size": 8},
}
#: The synthetic dataset of each size.
VIDEOS = {"full": {"num_classes": 4, "videos_per_class": 40, "val_fraction": 0.4, "video_frames": 8},
          "quick": {"num_classes": 4, "videos_per_class": 6, "val_fraction": 0.25,
                    "video_frames": 8}}
IMAGE_ONLY = [0, 0, 0, 0]
STDHA = [1, -1, 0, 0]


class CachedClips(Dataset):
    """Decode every video once (deterministic test-mode clip) and keep the tensors.

    Training adds a horizontal flip (``flip``) with an optional label swap for mirror-image
    classes, drawn from a generator seeded by ``(seed, epoch, index)`` so runs are reproducible.
    """

    def __init__(self, dataset, train: bool, flip: bool = False, flip_label_map: Optional[dict] = None,
                 seed: int = 0):
        items = [dataset[i] for i in range(len(dataset))]
        self.videos = torch.stack([v[0] if v.dim() == 5 else v for v, _ in items])  # (N, C, T, H, W)
        self.labels = [int(lbl) for _, lbl in items]
        self.samples = list(getattr(dataset, "samples", []))
        self.num_classes = getattr(dataset, "num_classes", max(self.labels) + 1)
        self.train, self.flip, self.seed, self.epoch = train, bool(flip), seed, 0
        self.flip_label_map = symmetric_label_map(flip_label_map) or {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        v, y = self.videos[i], self.labels[i]
        if self.train and self.flip:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, int(i))) % 2**31)
            if torch.rand((), generator=g) < 0.5:
                v, y = v.flip(-1), self.flip_label_map.get(y, y)
        return v, y


def demo_config(out_dir: Path, offsets, *, quick: bool = False, epochs: Optional[int] = None,
                seed: int = 0, train_backbone: bool = False, progress: bool = True):
    """The run config of one demo run: :data:`RECIPE` with :data:`DEMO` (and :data:`QUICK`), and
    this run's head offsets, output folder and switches."""
    from .config import deep_update, read_yaml

    d = deep_update(read_yaml(RECIPE), copy.deepcopy(DEMO))
    if quick:
        d = deep_update(d, copy.deepcopy(QUICK))
    run = {"model": {"head_offsets": list(offsets), "train_backbone": train_backbone},
           "train": {"seed": seed, "out_dir": str(out_dir), "progress": progress}}
    if epochs:
        run["train"]["epochs"] = int(epochs)
    return load_config(None, base=deep_update(d, run))


def rotating_times(fns: dict, runs: int, warmup: int = 2) -> dict:
    """Per-round wall times of each ``name -> zero-argument callable``. Every round times each
    callable once, in rotating order (alternating for two), so that the machine's drift (shared
    CPUs) hits all of them alike. Also used by benchmarks/test_bench_core.py."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(runs):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    return times


@torch.no_grad()
def clips_per_second(fns: dict, clips: int, warmup: int = 2, runs: int = 7) -> dict:
    """Throughput of each callable: ``clips`` over its median time in :func:`rotating_times`."""
    return {n: clips / statistics.median(ts) for n, ts in rotating_times(fns, runs, warmup).items()}


def run_demo(out_dir: str = "demo_out", epochs: Optional[int] = None, seed: int = 0,
             quick: bool = False, train_backbone: bool = False, threads: Optional[int] = None,
             progress: Optional[bool] = None, print_table: bool = True) -> dict:
    import timm

    from ..data import build_dataset, make_synthetic_dataset

    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    progress = (not quick) if progress is None else progress
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = demo_config(out, STDHA, quick=quick, epochs=epochs, seed=seed,
                       train_backbone=train_backbone, progress=progress)
    epochs = base.train.epochs

    # ---- 1. data (real mp4 files), decoded once
    d = VIDEOS["quick" if quick else "full"]
    img, nf = base.data.size, base.model.num_frames
    info = make_synthetic_dataset(out / "data", num_classes=d["num_classes"],
                                  videos_per_class=d["videos_per_class"],
                                  num_frames=d["video_frames"], size=img, seed=seed,
                                  val_fraction=d["val_fraction"])
    t_data = time.perf_counter() - t_start
    common = dict(num_frames=nf, sampling="uniform", size=img, seed=seed, rand_augment=None)
    train_ds = CachedClips(build_dataset(info["train"], info["root"], train=False, **common),
                           train=True, flip=info["flip"], flip_label_map=info["flip_label_map"],
                           seed=seed)
    val_ds = CachedClips(build_dataset(info["val"], info["root"], train=False, **common), train=False)
    classes = list(info["classes"])

    # ---- 2. two runs, identical except the head offsets
    runs = {}
    for name, offsets in (("image_only", IMAGE_ONLY), ("stdha", STDHA)):
        cfg = demo_config(out / name, offsets, quick=quick, epochs=epochs, seed=seed,
                          train_backbone=train_backbone, progress=progress)
        t0 = time.perf_counter()
        res = train(cfg, datasets={"train": train_ds, "val": val_ds}, overwrite=True)
        runs[name] = {"offsets": offsets, "result": res, "time_s": time.perf_counter() - t0,
                      "config": cfg}
        write_eval_report(res["val"], out / f"{name}_results.json", classes,
                          title=f"{name} (offsets {offsets})")

    # ---- 3. merge the STDHA model, check and evaluate it
    model = runs["stdha"]["result"]["model"].eval()
    merged = merge_adapters(model).eval()
    err = merged_vs_unmerged_error(model, merged)
    merged_metrics = evaluate(merged, val_ds, 16, torch.device("cpu"), len(classes))
    write_eval_report(merged_metrics, out / "stdha_merged_results.json", classes,
                      title="STDHA, merged")
    cfg = runs["stdha"]["config"]
    merged.class_names = classes
    merged_path = merged.save_pretrained(out / "stdha_merged", run_config=cfg.to_dict())
    (out / "classes.txt").write_text("\n".join(classes) + "\n")

    # ---- 4. parameters and throughput (merged ZeroI2V vs the plain timm ViT, same frames)
    mk = {"name": base.model.name, "timm_kwargs": dict(base.model.timm_kwargs),
          "num_frames": base.model.num_frames}
    plain = timm.create_model(mk["name"], pretrained=False, num_classes=len(classes),
                              **mk["timm_kwargs"]).eval()
    n_plain = count_params(plain)
    n_image = image_model_params(model.config)
    clips = 8
    x = val_ds.videos[torch.arange(clips) % len(val_ds)]
    # The plain ViT does the same job as the video model: it gets the same (B, C, T, H, W) clips,
    # makes frames of them (a transposing copy, as ZeroI2VViT does) and averages over the frames.
    t = x.shape[2]

    def plain_clips():
        return plain(x.transpose(1, 2).flatten(0, 1)).unflatten(0, (-1, t)).mean(1)

    tp = clips_per_second({"plain": plain_clips,
                           "merged": lambda: merged(x),
                           "unmerged": lambda: model(x)}, x.shape[0], runs=5 if quick else 31)
    tp_plain, tp_merged, tp_unmerged = tp["plain"], tp["merged"], tp["unmerged"]

    res_io, res_st = runs["image_only"]["result"], runs["stdha"]["result"]
    results = {
        "settings": {"quick": quick, "epochs": epochs, "seed": seed, "train_backbone": train_backbone,
                     "model": mk, "classes": classes, "train_videos": len(train_ds),
                     "val_videos": len(val_ds), "threads": torch.get_num_threads()},
        "image_only": {"head_offsets": IMAGE_ONLY, **summary(res_io["val"]),
                       "train_loss": res_io["train_loss"], "params": count_params(res_io["model"]),
                       "train_time_s": runs["image_only"]["time_s"]},
        "stdha": {"head_offsets": STDHA, **summary(res_st["val"]),
                  "train_loss": res_st["train_loss"], "params": count_params(model),
                  "train_time_s": runs["stdha"]["time_s"], "clips_per_s": tp_unmerged},
        "stdha_merged": {**summary(merged_metrics), "params": count_params(merged),
                         "clips_per_s": tp_merged, "file": str(merged_path)},
        "plain_vit": {"params": n_plain, "params_no_head": n_image, "clips_per_s": tp_plain},
        "merged_vs_unmerged_max_rel_err": err,
        "data_time_s": t_data,
    }
    results["wall_time_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if print_table:
        print_demo_table(results)
    return results


def print_demo_table(r: dict) -> None:
    from rich.table import Table

    from ..progress import console

    t = Table(title="ZeroI2V demo: synthetic temporal-order videos "
                    f"({len(r['settings']['classes'])} classes, chance "
                    f"{100 / len(r['settings']['classes']):.0f}%)")
    for c, j in (("model", "left"), ("head offsets", "left"), ("val top-1 (%)", "right"),
                 ("mean class acc (%)", "right"), ("parameters", "right"), ("clips/s", "right")):
        t.add_column(c, justify=j)
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    io, st, mg, pv = r["image_only"], r["stdha"], r["stdha_merged"], r["plain_vit"]
    t.add_row("image-only ViT + adapters", str(io["head_offsets"]), fmt(io["top1"]),
              fmt(io["mean_class_acc"]), f"{io['params']:,}", "-")
    t.add_row("STDHA + adapters (training form)", str(st["head_offsets"]), fmt(st["top1"]),
              fmt(st["mean_class_acc"]), f"{st['params']:,}", f"{st['clips_per_s']:.1f}")
    t.add_row("STDHA merged (deployed)", str(st["head_offsets"]), fmt(mg["top1"]),
              fmt(mg["mean_class_acc"]), f"{mg['params']:,}", f"{mg['clips_per_s']:.1f}")
    t.add_row("plain timm ViT, same frames", "-", "-", "-", f"{pv['params']:,}",
              f"{pv['clips_per_s']:.1f}")
    con = console()
    con.print(t)
    con.print(f"merged vs unmerged max relative output error: {r['merged_vs_unmerged_max_rel_err']:.2e}")
    trained = "whole backbone" if r["settings"]["train_backbone"] else "frozen backbone"
    con.print(f"merged params = plain ViT without head ({pv['params_no_head']:,}) + temporal "
              f"embedding + head; training: {trained}, "
              f"{r['settings']['epochs']} epochs, {r['settings']['threads']} threads")
    gap = (st["top1"] or 0) - (io["top1"] or 0)
    if gap < 10:
        con.print(f"[yellow]note: STDHA is not clearly better than image-only in this run "
                  f"({gap:+.1f} points); with the default settings it is (see the README). Fewer "
                  "epochs or a changed setting may not leave it enough steps.[/yellow]")
    con.print(f"wall time {r['wall_time_s']:.1f} s (data {r['data_time_s']:.1f} s); outputs in "
              f"{Path(r['stdha_merged']['file']).parent}")
