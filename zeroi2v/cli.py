"""The ``zeroi2v`` command.

    zeroi2v train   CONFIG.yaml [--set key.sub=value ...] [--out DIR] [--overwrite]
    zeroi2v train   --resume --out DIR [--set train.epochs=N]   continue a run exactly
    zeroi2v eval    MODEL [--ann FILE] [--root DIR] [--set ...] [--out results.json]
    zeroi2v merge   MODEL --out DIR                    fold the adapters: a plain ViT + STDHA
    zeroi2v predict MODEL VIDEO [--topk 5] [--class-names FILE]
    zeroi2v export  MODEL --out FILE [--format onnx|pt2] [--dynamic-batch]
    zeroi2v import-official CKPT --out DIR [--head-offsets ...] [--merge]
    zeroi2v push    MODEL ORG/NAME [--private] [--eval results.json]   upload to the Hub
    zeroi2v demo    [--out demo_out] [--epochs N] [--seed S] [--quick]
    zeroi2v config  [CONFIG.yaml] [--set ...]          print the resolved config

MODEL is a saved model folder (``config.json`` + ``model.safetensors``, as written by
``save_pretrained``, ``merge``, ``import-official``), its ``model.safetensors``, a training
checkpoint folder (``OUT/last``, ``OUT/best``), a training output folder (its ``last``) or a
model on the Hugging Face Hub, ``hf-hub:ORG/NAME[@REVISION]`` (through the Hub's cache; the same
checks as a folder). CKPT of ``import-official`` may be ``hf-hub:ORG/REPO[@REV]:path/file.pth``.
Data: ``zeroi2v prepare SRC DST [--short-side 256] [--fps F] [--workers N]`` re-encodes a video
tree for training (:mod:`zeroi2v.data.prepare`); with ``--shards [--shard-size 1GB]`` into tar
shards and an index (:mod:`zeroi2v.data.shard_writer`).

Multi-GPU / multi-node: ``torchrun --nproc_per_node N -m zeroi2v.cli train CONFIG.yaml`` (or
``torchrun ... $(which zeroi2v) train ...``); the same command without torchrun is one process
(CPU: gloo backend when run under torchrun without CUDA).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from . import settings


def _version() -> str:
    import torch

    from . import __version__

    return f"{__version__} (torch {torch.__version__})"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value with a dotted key, e.g. --set train.lr=1e-4 "
                        "(repeatable; values are parsed as YAML)")
    p.add_argument("--pretrained", default=None,
                   help="local image-model weights (overrides model.pretrained)")


_MODEL_HELP = ("saved model folder (config.json + model.safetensors), its .safetensors, a "
               "training checkpoint folder, a training output folder (its 'last'), or "
               "hf-hub:ORG/NAME[@REVISION] (a model on the Hugging Face Hub)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="zeroi2v",
        description="ZeroI2V: adapt an image ViT to video with STDHA + linear adapters, then merge "
                    "the adapters into a plain ViT.")
    ap.add_argument("--version", action="version", version=f"zeroi2v {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a video model from a YAML config",
                       description="Train from a YAML config (configs/*.yaml; every key is "
                                   "checked, see `zeroi2v config`). Writes OUT/checkpoints/, "
                                   "OUT/last, OUT/best, OUT/log.jsonl, OUT/config.yaml.")
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config (see configs/); not needed with --resume, which continues "
                        "the run with its own saved config")
    _add_common(p)
    p.add_argument("--out", default=None, help="output folder (train.out_dir)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue a run exactly: a checkpoint folder (no value: OUT/last). A "
                        "config or --set may change only what does not change the numbers "
                        "(train.epochs to extend it, workers, progress)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in the output folder (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("eval", help="evaluate a saved model or checkpoint (top-1/5, mean class acc)")
    p.add_argument("checkpoint", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--ann", default=None, help="annotation file (default data.test_ann, then data.val_ann)")
    p.add_argument("--root", default=None, help="video folder (default data.val_root/data.root)")
    _add_common(p)
    p.add_argument("--out", default=None, help="results JSON (default: eval.json beside the "
                                                  "model); with _confusion.png, _per_class.csv/md")
    p.add_argument("--overwrite", action="store_true", help="replace the results of --out")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--class-names", default=None, help="text file, one class name per line")
    p.add_argument("--merge", action="store_true", help="merge the adapters before evaluating")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("merge", help="fold the adapters into the frozen linears (a plain ViT)")
    p.add_argument("checkpoint", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--out", required=True, help="folder for the merged model (new or empty)")
    p.add_argument("--pretrained", default=None,
                   help="image weights of a checkpoint that holds only its trainable tensors")

    p = sub.add_parser("predict", help="classify one video file")
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
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
                       help="convert an official (mmaction2) ZeroI2V checkpoint into a saved model")
    p.add_argument("checkpoint", metavar="CKPT",
                   help="official .pth (read without running code), or a file on the Hugging "
                        "Face Hub: hf-hub:ORG/REPO[@REVISION]:path/to/file.pth")
    p.add_argument("--out", required=True, help="folder for the saved model (new or empty)")
    p.add_argument("--head-offsets", default=None,
                   help="preset name or comma-separated ints; required unless the checkpoint is "
                        "one of the released configurations")
    p.add_argument("--adapter-scale", type=float, default=None,
                   help="default: the recipe's (1.0 for SSv2, 0.5 otherwise)")
    p.add_argument("--num-heads", type=int, default=None, help="default: from --head-offsets")
    p.add_argument("--model-name", default=None, help="timm architecture (default: CLIP ViT)")
    p.add_argument("--merge", action="store_true",
                   help="fold the adapters before saving (a plain ViT + STDHA, as `merge`)")

    # -- the Hugging Face Hub (zeroi2v/models/hub_push.py)
    p = sub.add_parser("push", help="upload a saved model to the Hugging Face Hub, with a "
                                    "generated model card")
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("repo_id", metavar="ORG/NAME", help="model repository (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to push to (default main)")
    p.add_argument("--eval", dest="eval_results", default=None,
                   help="results JSON of `zeroi2v eval` for the card (default: MODEL/eval.json "
                        "when there is one)")
    p.add_argument("--license", default=None,
                   help="the card's licence (default: the image weights' licence, when known)")
    p.add_argument("--message", default=None, help="commit message")

    p = sub.add_parser("export", help="export a (merged) model for other runtimes: ONNX or "
                                      "torch.export")
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--out", required=True, help="output file (.onnx or .pt2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--format", choices=("onnx", "pt2"), default=None,
                   help="default: from the --out suffix")
    p.add_argument("--batch-size", type=int, default=1,
                   help="videos per call (the fixed batch; with --dynamic-batch, the example)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="accept any number of videos per call (frames and image size stay fixed)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (TorchScript exporter)")
    p.add_argument("--pretrained", default=None,
                   help="image weights of a checkpoint that holds only its trainable tensors")

    from .data.prepare import add_prepare_parser

    add_prepare_parser(sub)
    for sp in sub.choices.values():
        sp.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also ZEROI2V_DEBUG=1)")
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
    """``(model, run config)`` for the MODEL argument, with ``--set`` applied to the run config
    (a different ``model.num_frames`` re-targets the model)."""
    from .models.merge import merge_adapters
    from .train.build import load_model_and_run_config
    from .train.config import apply_overrides

    path = args.checkpoint if hasattr(args, "checkpoint") else args.model
    overrides = getattr(args, "overrides", None) or []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not (key.startswith(_INFERENCE_KEYS) or key in _INFERENCE_KEYS):
            raise ValueError(
                f"--set {key}: does not apply to a trained model (its architecture, weights and "
                "training settings come from MODEL); only data.*, eval.*, model.num_frames, "
                "train.amp and train.batch_size can be changed")
    model, cfg, _ = load_model_and_run_config(path, pretrained=getattr(args, "pretrained", None))
    if merge and not model.merged:
        model = merge_adapters(model, inplace=True).eval()
    print(f"model: {model.config.summary()}", file=sys.stderr)
    cfg = apply_overrides(cfg, overrides)
    t = cfg.model.num_frames
    if t != model.num_frames:
        model.set_num_frames(t)
    return model, cfg


_INFERENCE_KEYS = ("data.", "eval.", "model.num_frames", "train.amp", "train.batch_size")


def _class_names(path: Optional[str], model) -> Optional[list]:
    from .data.annotations import read_class_names

    if path is None:
        return list(model.class_names) if model.class_names else None
    names = read_class_names(path)
    if len(names) != model.head.out_features:
        raise ValueError(f"--class-names {path} has {len(names)} names, the model "
                         f"{model.head.out_features} classes")
    return names


def _new_output_folder(path: str) -> Path:
    """``--out`` for a saved model: a new folder, or an empty one (nothing is overwritten)."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder: choose a new one "
                         "(nothing was written)")
    if out.exists():
        out.rmdir()
    return out


def _new_output_files(paths: Sequence[Path], overwrite: bool) -> None:
    """``--out`` files: never a file of a saved model (whatever ``--overwrite`` says), and never
    an existing file unless ``--overwrite``."""
    from .models.artefact import MODEL_FILES

    for p in paths:
        if p.name in MODEL_FILES and (p.parent / "config.json").is_file():
            raise ValueError(f"--out {p} is a file of the saved model in {p.parent}: choose a "
                             "path outside the model folder (nothing was written)")
        if p.is_dir():
            raise ValueError(f"--out {p} is a folder: name a file (nothing was written)")
        if p.exists() and not overwrite:
            raise ValueError(f"--out {p} exists: choose another name or pass --overwrite "
                             "(nothing was written)")


def _save_new(model, out: Path, **kwargs) -> Path:
    from .files import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, **kwargs)
    return out


# ----------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from .train.checkpoint import saved_run_config
    from .train.config import apply_overrides, load_config
    from .train.engine import train
    from .train.evaluation import summary
    from .train.run import resume_path

    if args.config is None and args.resume not in (None, "auto") and \
            Path(args.resume).suffix in (".yaml", ".yml") and Path(args.resume).is_file():
        args.config, args.resume = args.resume, "auto"  # `train --resume my.yaml`
    over = list(args.overrides)
    if args.out:
        over.append(f"train.out_dir={args.out}")
    if args.pretrained:
        over.append(f"model.pretrained={args.pretrained}")
    if args.no_progress:
        over.append("train.progress=false")
    if args.config is not None:
        cfg = load_config(args.config, over)
    elif args.resume is not None:  # the run's own config, with what the command line changes
        if args.resume == "auto" and not args.out:
            raise ValueError("--resume without a config needs the run's folder: zeroi2v train "
                             "--resume --out DIR (or --resume DIR/last)")
        out = Path(args.out) if args.out else None
        ckpt = resume_path(args.resume, out or Path("."))
        cfg = apply_overrides(saved_run_config(ckpt), over)
    else:
        raise ValueError("train needs a YAML config (zeroi2v train CONFIG.yaml), or --resume "
                         "--out DIR to continue a run")
    res = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        out = {k: v for k, v in res.items() if k not in ("model", "val")}
        if res.get("val"):
            out["val"] = summary(res["val"])
        print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_eval(args) -> int:
    from .train import dist as zdist
    from .train.build import build_test_dataset, test_annotations
    from .train.evaluation import evaluate, write_eval_report
    from .train.runtime import amp_dtype

    _eval_out(args)  # a bad --out is refused before any work
    info = zdist.init_distributed()
    try:
        model, cfg = _load_model_for(args, merge=args.merge)
        ann = test_annotations(cfg, args.ann)
        ds = build_test_dataset(cfg, ann, args.root)
        used = len(set(getattr(ds, "labels", []) or []))
        if 0 < used < model.head.out_features and info.is_main:
            print(f"note: {ann} uses {used} of the model's {model.head.out_features} classes "
                  "(metrics over those; predictions may name any class)", file=sys.stderr)
        names = _class_names(args.class_names, model)
        device = info.device
        model.to(device)
        num_classes = model.head.out_features
        bs = args.batch_size or cfg.eval.batch_size or cfg.train.batch_size
        t0 = time.perf_counter()
        m = evaluate(model, ds, bs, device, num_classes,
                     amp_dtype(cfg.train.amp, device), cfg.data.num_workers,
                     progress=not args.no_progress)
        dt = time.perf_counter() - t0
        if info.is_main:
            out = _eval_out(args)
            res = write_eval_report(m, out, names, extra={
                "checkpoint": str(args.checkpoint), "ann_file": str(ann), "merged": model.merged,
                "views": cfg.eval.num_clips * cfg.eval.num_crops,
                "world_size": info.world_size, "eval_time_s": dt})
            _print_metrics(res, out)
    finally:
        zdist.cleanup(info)
    return 0


def _eval_out(args) -> Path:
    """The results JSON of ``eval`` (its siblings share the stem), checked like every --out;
    the default, ``eval.json`` beside the model, is the evaluation's own and is replaced (for a
    model on the Hub: ``./eval.json``, checked like an --out)."""
    out = Path(args.out) if args.out is not None else None
    if out is None and _is_hub_id(args.checkpoint):  # nothing is written into the Hub's cache
        out = Path("eval.json")
    elif out is None:
        src = Path(args.checkpoint)
        return (src if src.is_dir() else src.parent) / "eval.json"
    stem = out.with_suffix("")
    _new_output_files([out] + [stem.with_name(stem.name + s) for s in
                               ("_confusion.png", "_per_class.csv", "_per_class.md")],
                      args.overwrite)
    return out


def _print_metrics(res: dict, out: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="evaluation")
    cols = [("videos", str(res["num_samples"])), ("top-1 (%)", f"{res['top1']:.2f}")]
    if "top5" in res:  # not with 5 classes or fewer (it would be 100 % by construction)
        cols.append(("top-5 (%)", f"{res['top5']:.2f}"))
    cols.append(("mean class acc (%)", f"{res['mean_class_acc']:.2f}"))
    for c, _ in cols:
        t.add_column(c, justify="right")
    t.add_row(*[v for _, v in cols])
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

    from .models.merge import merge_adapters, merged_vs_unmerged_error
    from .models.video_vit import count_params, image_model_params
    from .train.build import load_model_and_run_config

    out = _new_output_folder(args.out)
    model, cfg, art = load_model_and_run_config(args.checkpoint, pretrained=args.pretrained)
    if model.merged:
        raise ValueError(f"{args.checkpoint} is already a merged model")
    merged = merge_adapters(model)
    err = merged_vs_unmerged_error(model, merged)
    _save_new(merged, out, run_config=cfg, extra={"merged_from": _model_source(args.checkpoint,
                                                                                art.folder)})
    n_img = image_model_params(model.config)
    added = count_params(merged.backbone) - n_img
    t = Table(title="merge")
    t.add_column("")
    t.add_column("parameters", justify="right")
    t.add_row("image ViT (timm, no head)", _fmt_int(n_img))
    t.add_row("ZeroI2V, adapters (training)", _fmt_int(count_params(model)))
    t.add_row("ZeroI2V, merged (deployed)", _fmt_int(count_params(merged)))
    t.add_row("  = image ViT + temporal emb. + head" + (" + folded biases" if added else ""),
              _fmt_int(n_img + model.temporal_embedding.numel() + added
                       + sum(p.numel() for p in model.head.parameters())))
    con = _console()
    con.print(t)
    if added:
        kw = {k: v for k, v in merged.config.timm_kwargs.items()
              if model.config.timm_kwargs.get(k) != v}
        con.print(f"the merge gave {added:,} bias parameters to bias-free layers: the merged "
                  f"backbone is timm's {merged.config.model_name} with {kw}")
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
        c = cfg.model_copy(deep=True)
        c.data.on_error = "raise"
        ds = build_test_dataset(c, str(ann), str(vp.resolve().parent))
        views, _ = ds[0]
    return views if views.dim() == 5 else views.unsqueeze(0)


def cmd_predict(args) -> int:
    import torch

    from .train.runtime import amp_dtype, autocast

    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    model, cfg = _load_model_for(args)
    names = _class_names(args.class_names, model)
    device = _device()
    model.to(device).eval()
    views = load_video_views(args.video, cfg).to(device)
    with torch.no_grad(), autocast(device, amp_dtype(cfg.train.amp, device)):
        logits = model(views)
    probs = logits.float().softmax(-1).mean(0).cpu()
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


def _offsets_arg(text: Optional[str]):
    """``--head-offsets``: a preset name, or ints separated by commas (``1,-1,0,0``)."""
    if text is None:
        return None
    if re.fullmatch(r"\s*\[?\s*[+-]?\d+(\s*,\s*[+-]?\d+)*\s*\]?\s*", text):
        return [int(t) for t in text.strip(" []").split(",")]
    return text.strip()


def cmd_import_official(args) -> int:
    """Official mmaction2 checkpoint -> a saved model folder that eval/merge/predict accept."""
    from .interop import load_official_checkpoint
    from .models.artefact import load_model
    from .models.merge import merge_adapters
    from .models.video_vit import count_params

    out = _new_output_folder(args.out)
    path, extra = args.checkpoint, {"imported_from": str(args.checkpoint)}
    if _is_hub_id(path):  # the file through the Hub's cache; its commit and hash recorded
        from .models import hub

        path, record = hub.file_from_hub(path)
        extra = {"imported_from": hub.pinned_id(record), "imported_sha256": record["sha256"]}
    model = load_official_checkpoint(path, head_offsets=_offsets_arg(args.head_offsets),
                                     adapter_scale=args.adapter_scale, num_heads=args.num_heads,
                                     model_name=args.model_name)
    if args.merge and not model.merged:
        model = merge_adapters(model, inplace=True)
    _save_new(model, out, extra=extra)
    rebuilt = load_model(out)  # self-check: the folder rebuilds the same model
    print(f"converted {args.checkpoint} -> {out} ({count_params(rebuilt):,} parameters, "
          f"{rebuilt.num_frames} frames, head offsets {list(rebuilt.head_offsets)}, "
          f"adapter scale {rebuilt.config.adapter_scale}, merged={rebuilt.merged})")
    return 0


def cmd_export(args) -> int:
    import torch

    from .interop.export import export_onnx, export_program, onnx_exporter, onnx_files
    from .models.families import input_channels

    fmt = args.format or {".onnx": "onnx", ".pt2": "pt2"}.get(Path(args.out).suffix)
    if fmt is None:
        raise ValueError(f"--out {args.out}: say --format onnx or pt2 (or end the name in .onnx "
                         "/ .pt2)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if fmt == "onnx":
        onnx_exporter()  # a missing package is reported before the model is loaded
    out = Path(args.out)  # an ONNX export may also write its weights beside, as NAME.data
    _new_output_files([out, out.with_name(out.name + ".data")] if fmt == "onnx" else [out],
                      args.overwrite)
    model, cfg = _load_model_for(argparse.Namespace(model=args.model, pretrained=args.pretrained),
                                 merge=True)
    size = model.backbone.patch_embed.img_size
    example = torch.randn(args.batch_size, input_channels(model.backbone), model.num_frames, *size)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        export_onnx(model, example, out, opset_version=args.opset,
                    dynamic_batch=args.dynamic_batch)
        files = onnx_files(out)
    else:
        torch.export.save(export_program(model, example, dynamic_batch=args.dynamic_batch),
                          str(out))
        files = [out]
    batch = "any" if args.dynamic_batch else str(args.batch_size)
    shape = f"({batch}, {', '.join(str(d) for d in example.shape[1:])})"
    print(f"exported merged model -> {out} ({fmt}, input video {shape} (B, C, T, H, W))")
    if len(files) > 1:
        print(f"the weights ({sum(f.stat().st_size for f in files[1:]) / 2**30:.2f} GiB) exceed "
              "what one ONNX file may hold and are in "
              f"{', '.join(str(f) for f in files[1:])}: keep them in the same folder as {out}")
    return 0


def _is_hub_id(x) -> bool:
    from .models.hub import is_hub_id

    return is_hub_id(x)


def _model_source(arg: str, folder: Path) -> str:
    """What a model was read from, for the record: the folder, or the Hub id pinned to the
    commit its files came from."""
    if not _is_hub_id(arg):
        return str(folder)
    from .models import hub

    ref = hub.parse_hub_id(arg)
    return str(hub.HubRef(ref.repo_id, hub.commit_of(folder / "config.json", "config.json")
                          or ref.revision))


def cmd_push(args) -> int:
    """A saved model (with its run config and eval.json, when beside it) -> a Hub repository."""
    from .models.hub import is_hub_id
    from .models.hub_push import push_to_hub
    from .train.build import load_model_and_run_config

    if is_hub_id(args.model):
        raise ValueError(f"{args.model} is on the Hub already: push a local model folder")
    model, cfg, art = load_model_and_run_config(args.model)
    results = args.eval_results
    if results is None and (art.folder / "eval.json").is_file():
        results = art.folder / "eval.json"
    info = push_to_hub(model, args.repo_id, run_config=cfg if art.run_config_file else None,
                       eval_results=results, private=args.private or None,
                       revision=args.revision, commit_message=args.message,
                       license=args.license)
    url = getattr(info, "commit_url", None) or getattr(info, "oid", None) or info
    print(f"pushed {art.folder} -> hf-hub:{args.repo_id} ({url}); load it with "
          f"zeroi2v.load_model(\"hf-hub:{args.repo_id}\")")
    return 0


def cmd_prepare(args) -> int:
    from .data.prepare import run_prepare

    return run_prepare(args)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "predict": cmd_predict,
            "demo": cmd_demo, "config": cmd_config, "import-official": cmd_import_official,
            "export": cmd_export, "prepare": cmd_prepare, "push": cmd_push}


def _user_errors() -> tuple:
    """Exceptions that mean a user mistake (a file, a setting, a model or video that does not fit),
    reported as one line; anything else is a bug and keeps its traceback."""
    from .data.decoders import VideoDecodeError
    from .errors import MissingDependencyError, UnsupportedModelError

    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, UnsupportedModelError, VideoDecodeError,
            MissingDependencyError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        debug = getattr(args, "debug", False) or settings.debug()
    except ValueError as e:  # a bad ZEROI2V_DEBUG value
        print(f"zeroi2v {args.command}: error: {e}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args) or 0
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"zeroi2v {args.command}: interrupted (Ctrl-C){_resume_hint(args, e)}",
              file=sys.stderr)
        return 130
    except _user_errors() as e:
        if debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"zeroi2v {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug or e.errno not in _DISK_ERRNOS:
            raise
        print(f"zeroi2v {args.command}: error: {_disk_message(e)}", file=sys.stderr)
        return 2


def _disk_errnos() -> frozenset:
    import errno

    return frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM",
                                                 "EFBIG") if hasattr(errno, n))


_DISK_ERRNOS = _disk_errnos()


def _disk_message(e: OSError) -> str:
    """A full disk, a read-only file system or a permission error, as one line: what, where,
    and that what was there is intact (every write is atomic)."""
    import errno

    where = f" writing {e.filename}" if e.filename else ""
    fix = {errno.ENOSPC: "free some space or write elsewhere",
           errno.EROFS: "write to a writable folder",
           errno.EACCES: "write where you have permission, or fix the folder's permissions",
           errno.EPERM: "write where you have permission, or fix the folder's permissions"
           }.get(e.errno, "free some space or write elsewhere")
    return (f"{e.strerror or os.strerror(e.errno)}{where}: {fix}; files written earlier are "
            "intact (zeroi2v replaces files only once they are complete)")


def _resume_hint(args, e: BaseException) -> str:
    from .train.engine import TrainingInterrupted

    if not isinstance(e, TrainingInterrupted):
        return ""
    if e.last_epoch is None:
        return f" in epoch {e.epoch}, before the first checkpoint: nothing to resume"
    import shlex

    cmd = f"zeroi2v train --resume --out {shlex.quote(str(e.out_dir))}"
    return (f" in epoch {e.epoch}; the last complete checkpoint is {e.out_dir / 'last'} (epoch "
            f"{e.last_epoch}); continue with: {cmd}")


if __name__ == "__main__":
    sys.exit(main())
