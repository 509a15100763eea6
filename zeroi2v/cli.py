"""The ``zeroi2v`` command.

    zeroi2v train   CONFIG.yaml [--set key.sub=value ...] [--resume [CKPT]] [--out DIR]
    zeroi2v eval    CKPT [--ann FILE] [--root DIR] [--set ...] [--out results.json]
    zeroi2v merge   CKPT --out merged.pth
    zeroi2v predict MODEL VIDEO [--topk 5] [--class-names FILE]
    zeroi2v demo    [--out demo_out] [--epochs N] [--seed S] [--quick]
    zeroi2v config  [CONFIG.yaml] [--set ...]          print the resolved config
    zeroi2v import-official CKPT --out FILE            (zeroi2v.interop)
    zeroi2v export  MODEL --out FILE                   (zeroi2v.interop)
    zeroi2v prepare SRC DST [--short-side 256] [--fps F] [--workers N]   (zeroi2v.data.prepare)

Multi-GPU / multi-node: ``torchrun --nproc_per_node N -m zeroi2v.cli train CONFIG.yaml`` (or
``torchrun ... $(which zeroi2v) train ...``); the same command without torchrun is one process
(CPU: gloo backend when run under torchrun without CUDA).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value with a dotted key, e.g. --set train.lr=1e-4 "
                        "(repeatable; values are parsed as YAML)")
    p.add_argument("--pretrained", default=None,
                   help="local image-model weights (overrides model.pretrained)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="zeroi2v",
        description="ZeroI2V: adapt an image ViT to video with STDHA + linear adapters, then merge "
                    "the adapters into a plain ViT.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a video model from a YAML config")
    p.add_argument("config", help="YAML config (see configs/)")
    _add_common(p)
    p.add_argument("--out", default=None, help="output folder (train.out_dir)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint (no value: <out>/last.pth)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("eval", help="evaluate a checkpoint or merged model (top-1/5, mean class acc)")
    p.add_argument("checkpoint")
    p.add_argument("--ann", default=None, help="annotation file (default data.test_ann, then data.val_ann)")
    p.add_argument("--root", default=None, help="video folder (default data.val_root/data.root)")
    _add_common(p)
    p.add_argument("--out", default=None, help="results JSON (default: beside the checkpoint)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--class-names", default=None, help="text file, one class name per line")
    p.add_argument("--merge", action="store_true", help="merge the adapters before evaluating")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("merge", help="fold the adapters into the frozen linears (a plain ViT)")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="merged model file")
    p.add_argument("--pretrained", default=None)

    p = sub.add_parser("predict", help="classify one video file")
    p.add_argument("model", help="training checkpoint or merged model file")
    p.add_argument("video")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--class-names", default=None, help="text file, one class name per line")
    _add_common(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("demo", help="offline demo: synthetic videos, image-only vs STDHA, merge")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="an even smaller run (tests)")
    p.add_argument("--train-backbone", action="store_true",
                   help="fine-tune the whole ViT too (default: the paper's recipe, frozen backbone; "
                        "adapters, temporal embedding, final norm and head trained)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    p = sub.add_parser("config", help="print a resolved config")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("import-official",
                       help="convert an official (mmaction2) ZeroI2V checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further arguments for the converter (key=value)")

    p = sub.add_parser("export", help="export a merged model (zeroi2v.interop.export_merged)")
    p.add_argument("model")
    p.add_argument("--out", required=True)
    p.add_argument("--pretrained", default=None)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further arguments for the exporter (key=value)")

    from .data.prepare import add_prepare_parser

    add_prepare_parser(sub)
    return ap


# ----------------------------------------------------------------------------- helpers


def _console():
    from rich.console import Console

    return Console()


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _load_model_for(args, merge: bool = False):
    from .train.build import load_trained_model
    from .train.config import apply_overrides

    model, meta = load_trained_model(args.checkpoint if hasattr(args, "checkpoint") else args.model,
                                     pretrained=getattr(args, "pretrained", None), merge=merge)
    cfg = copy.deepcopy(meta["config"])
    apply_overrides(cfg, getattr(args, "overrides", None))
    t = int(cfg["model"]["num_frames"])
    if t != model.num_frames:
        model.set_num_frames(t)
    return model, meta, cfg


def _kv(items: Sequence[str]) -> dict:
    from .train.config import parse_value

    out = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"error: expected key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k.lstrip("-").replace("-", "_")] = parse_value(v)
    return out


# ----------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from .train.config import load_config
    from .train.engine import summary, train

    over = list(args.overrides)
    if args.out:
        over.append(f"train.out_dir={args.out}")
    if args.pretrained:
        over.append(f"model.pretrained={args.pretrained}")
    if args.no_progress:
        over.append("train.progress=false")
    cfg = load_config(args.config, over)
    res = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        out = {k: v for k, v in res.items() if k not in ("model", "val")}
        if res.get("val"):
            out["val"] = summary(res["val"])
        print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_eval(args) -> int:
    from .train import dist as zdist
    from .train.build import build_test_dataset, read_class_names
    from .train.engine import amp_dtype, evaluate, write_eval_report

    info = zdist.init_distributed()
    try:
        model, meta, cfg = _load_model_for(args, merge=args.merge)
        ann = args.ann or cfg["data"].get("test_ann") or cfg["data"].get("val_ann")
        if not ann:
            raise SystemExit("error: no annotation file (--ann, data.test_ann or data.val_ann)")
        ds = build_test_dataset(cfg, ann, args.root)
        names = read_class_names(args.class_names) if args.class_names else (
            meta.get("class_names") or (read_class_names(cfg["data"]["class_names"])
                                        if cfg["data"].get("class_names") else None))
        device = info.device
        model.to(device)
        bs = args.batch_size or int(cfg["eval"].get("batch_size") or cfg["train"]["batch_size"])
        t0 = time.perf_counter()
        m = evaluate(model, ds, bs, device, meta["num_classes"],
                     amp_dtype(cfg["train"].get("amp", "auto"), device),
                     int(cfg["data"].get("num_workers", 0)), progress=not args.no_progress)
        dt = time.perf_counter() - t0
        if info.is_main:
            out = Path(args.out) if args.out else Path(args.checkpoint).with_name(
                Path(args.checkpoint).stem + "_eval.json")
            res = write_eval_report(m, out, names, extra={
                "checkpoint": str(args.checkpoint), "ann_file": str(ann), "merged": model.merged,
                "views": int(cfg["eval"]["num_clips"]) * int(cfg["eval"]["num_crops"]),
                "world_size": info.world_size, "eval_time_s": dt})
            _print_metrics(res, out)
    finally:
        zdist.cleanup(info)
    return 0


def _print_metrics(res: dict, out: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="evaluation")
    for c in ("videos", "top-1 (%)", "top-5 (%)", "mean class acc (%)"):
        t.add_column(c, justify="right")
    t.add_row(str(res["num_samples"]), f"{res['top1']:.2f}", f"{res['top5']:.2f}",
              f"{res['mean_class_acc']:.2f}")
    con = _console()
    con.print(t)
    con.print(f"{res['num_samples']} of {res['num_videos']} videos evaluated; "
              f"{res['num_skipped']} unreadable (left out), {res['num_short']} shorter than the clip")
    for s in res["skipped"][:10]:
        con.print(f"  unreadable: {escape(s['path'])} ({escape(s['reason'])})")
    if res["num_skipped"] > 10:
        con.print(f"  ... {res['num_skipped'] - 10} more: see 'skipped' in the results JSON")
    con.print(f"results: {out}  (confusion matrix: {res['files']['confusion_png']}, "
              f"per-class table: {res['files']['per_class_md']})")


def cmd_merge(args) -> int:
    from rich.table import Table

    from .models.merge import merge_adapters
    from .train.build import (count_params, image_model_params, load_trained_model,
                              merged_vs_unmerged_error, save_merged)

    model, meta = load_trained_model(args.checkpoint, pretrained=args.pretrained)
    if model.merged:
        raise SystemExit(f"error: {args.checkpoint} is already a merged model")
    merged = merge_adapters(model)
    err = merged_vs_unmerged_error(model, merged)
    out = save_merged(merged, meta, args.out, source=str(args.checkpoint))
    n_img = image_model_params(meta["config"]["model"])
    t = Table(title="merge")
    t.add_column("")
    t.add_column("parameters", justify="right")
    t.add_row("image ViT (timm, no head)", _fmt_int(n_img))
    t.add_row("ZeroI2V, adapters (training)", _fmt_int(count_params(model)))
    t.add_row("ZeroI2V, merged (deployed)", _fmt_int(count_params(merged)))
    t.add_row("  = image ViT + temporal emb. + head",
              _fmt_int(n_img + model.temporal_embedding.numel()
                       + sum(p.numel() for p in model.head.parameters())))
    con = _console()
    con.print(t)
    con.print(f"merged vs unmerged max relative output error: {err:.3e}")
    con.print(f"merged model written to {out}")
    return 0


def load_video_views(video: str, cfg: dict):
    """The test-time views ``(V, C, T, H, W)`` of one video file, via the dataset pipeline."""
    from .train.build import build_test_dataset

    vp = Path(video)
    if not vp.is_file():
        raise FileNotFoundError(f"video not found: {vp}")
    with tempfile.TemporaryDirectory() as tmp:
        ann = Path(tmp) / "one.txt"
        ann.write_text(f"{vp.name} 0\n")
        c = copy.deepcopy(cfg)
        c["data"]["on_error"] = "raise"
        ds = build_test_dataset(c, str(ann), str(vp.resolve().parent))
        views, _ = ds[0]
    return views if views.dim() == 5 else views.unsqueeze(0)


def cmd_predict(args) -> int:
    import torch

    from .train.build import read_class_names
    from .train.engine import amp_dtype, autocast

    model, meta, cfg = _load_model_for(args)
    device = _device()
    model.to(device).eval()
    views = load_video_views(args.video, cfg).to(device)
    with torch.no_grad(), autocast(device, amp_dtype(cfg["train"].get("amp", "auto"), device)):
        logits = model(views)
    probs = logits.float().softmax(-1).mean(0).cpu()
    names = read_class_names(args.class_names) if args.class_names else meta.get("class_names")
    k = min(args.topk, probs.numel())
    top = probs.topk(k)
    rows = []
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        name = names[i] if names and i < len(names) else str(i)
        rows.append({"class_id": i, "label": name, "prob": p})
    if args.json:
        print(json.dumps({"video": args.video, "views": int(views.shape[0]), "topk": rows}, indent=2))
        return 0
    from rich.table import Table

    t = Table(title=f"{args.video} ({views.shape[0]} views)")
    t.add_column("rank", justify="right")
    t.add_column("class")
    t.add_column("id", justify="right")
    t.add_column("probability", justify="right")
    for r, row in enumerate(rows, 1):
        t.add_row(str(r), row["label"], str(row["class_id"]), f"{row['prob']:.4f}")
    _console().print(t)
    return 0


def cmd_demo(args) -> int:
    from .train.demo import run_demo

    run_demo(out_dir=args.out, epochs=args.epochs, seed=args.seed, quick=args.quick,
             train_backbone=args.train_backbone, threads=args.threads)
    return 0


def cmd_config(args) -> int:
    from .train.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_import_official(args) -> int:
    """Official mmaction2 checkpoint -> a zeroi2v model file that eval/merge/predict accept."""
    from .train.build import config_from_model, count_params, load_trained_model
    from .train.checkpoint import TRAIN_FORMAT, atomic_save, model_state
    from .train.config import DEFAULTS

    from .interop import load_official_checkpoint

    model = load_official_checkpoint(args.checkpoint, **_kv(args.extra))
    cfg = copy.deepcopy(DEFAULTS)
    cfg["model"].update(config_from_model(model))
    cfg["data"]["size"] = int(model.backbone.patch_embed.img_size[0])
    atomic_save({"format": TRAIN_FORMAT, "version": 1, "config": cfg,
                 "num_classes": int(model.head.out_features), "class_names": None,
                 "model": model_state(model, full=True), "model_full": True, "epoch": None,
                 "imported_from": str(args.checkpoint)}, args.out)
    rebuilt, _ = load_trained_model(args.out)  # self-check: the file rebuilds the same model
    print(f"converted {args.checkpoint} -> {args.out} ({count_params(rebuilt):,} parameters, "
          f"{rebuilt.num_frames} frames, head offsets {list(rebuilt.head_offsets)}, "
          f"merged={rebuilt.merged})")
    return 0


def cmd_export(args) -> int:
    from .interop import export_merged
    from .train.build import load_trained_model

    model, _ = load_trained_model(args.model, pretrained=args.pretrained, merge=True)
    files = export_merged(model, args.out, **_kv(args.extra))
    print(f"exported merged model -> {files.weights} + {files.config}")
    return 0


def cmd_prepare(args) -> int:
    from .data.prepare import run_prepare

    return run_prepare(args)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "predict": cmd_predict,
            "demo": cmd_demo, "config": cmd_config, "import-official": cmd_import_official,
            "export": cmd_export, "prepare": cmd_prepare}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .data.decoders import VideoDecodeError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except (FileNotFoundError, ValueError, VideoDecodeError) as e:
        print(f"zeroi2v {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
