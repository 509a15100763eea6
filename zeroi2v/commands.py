"""The ``zeroi2v`` commands: what each subcommand of :mod:`zeroi2v.cli` does (``cmd_*``), and
the helpers they share. Parsing and error reporting live in :mod:`zeroi2v.cli`."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

# ----------------------------------------------------------------------------- helpers


def _console():
    from .progress import console

    return console()


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
    from .safe_io import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, **kwargs)
    return out


# ----------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from .train.checkpoint import checkpoint_folder, run_folder_of, saved_run_config
    from .train.config import apply_overrides, load_config, set_values
    from .train.engine import train
    from .train.evaluation import summary
    from .train.run import resume_path

    if args.config is None and args.resume not in (None, "auto") and \
            Path(args.resume).suffix in (".yaml", ".yml") and Path(args.resume).is_file():
        args.config, args.resume = args.resume, "auto"  # `train --resume my.yaml`
    # paths are values, not YAML (`--out "exp #3"` is that folder, not "exp")
    values = {}
    if args.out:
        values["train.out_dir"] = args.out
    if args.pretrained:
        flag = args.pretrained.strip().lower()
        values["model.pretrained"] = {"true": True, "false": False, "none": None,
                                      "null": None}.get(flag, args.pretrained)
    if args.no_progress:
        values["train.progress"] = False
    if args.config is not None:
        cfg = set_values(load_config(args.config, args.overrides), values)
    elif args.resume is not None:  # the run's own config, with what the command line changes
        if args.resume == "auto" and not args.out:
            raise ValueError("--resume without a config needs the run's folder: zeroi2v train "
                             "--resume --out DIR (or --resume DIR/last)")
        own = None if args.out else run_folder_of(checkpoint_folder(args.resume))
        if not args.out and own is None:
            raise ValueError(f"{args.resume} is not inside a run's checkpoints folder: name the "
                             "folder to continue in with --out DIR")
        # a checkpoint without --out continues in the folder of the run that saved it
        ckpt = resume_path(args.resume, Path(args.out) if args.out else own)
        saved = saved_run_config(ckpt)
        if own is not None and Path(saved.train.out_dir).resolve() != own:  # moved, or cwd
            values["train.out_dir"] = str(own)
        cfg = set_values(apply_overrides(saved, args.overrides), values)
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
    from .data.annotations import same_classes
    from .train import dist as zdist
    from .train.build import build_test_dataset, test_annotations
    from .train.evaluation import evaluate, write_eval_report
    from .train.runtime import amp_dtype

    _eval_out(args)  # a bad --out is refused before any work
    info = zdist.init_distributed()
    try:
        model, cfg = _load_model_for(args, merge=args.merge)
        ann = test_annotations(cfg, args.ann)
        if not Path(ann).is_file():
            where = "" if args.ann else ", from the model's run config (data.test_ann/val_ann)"
            rel = "" if Path(ann).is_absolute() else f", relative to {Path.cwd()}"
            raise FileNotFoundError(f"annotation file not found: {ann}{where}{rel}: pass --ann "
                                    "FILE (and --root DIR for its videos)")
        ds = build_test_dataset(cfg, ann, args.root)
        evaluated = _evaluated_folder(args.checkpoint)
        data_names = getattr(ds, "class_names", None)
        if info.is_main:
            print(f"evaluating {evaluated or args.checkpoint} on {ann} "
                  f"({len(ds)} videos x {cfg.eval.num_clips * cfg.eval.num_crops} views)",
                  file=sys.stderr)
        used = len(set(getattr(ds, "labels", []) or []))
        if 0 < used < model.head.out_features and info.is_main:
            print(f"note: {ann} uses {used} of the model's {model.head.out_features} classes "
                  "(metrics over those; predictions may name any class)", file=sys.stderr)
        names = _class_names(args.class_names, model)
        what = f"--class-names {args.class_names}" if args.class_names else "the model"
        same_classes(names, data_names, model_source=what,
                     data_source=f"{ann} (classes from {getattr(ds, 'class_names_file', '')})")
        if names and not data_names and info.is_main:
            print(f"note: no classes.txt beside {ann}: its labels are taken as the model's class "
                  "ids, unchecked (a classes.txt there is checked against the model's classes)",
                  file=sys.stderr)
        names = names or data_names  # the report names the data's labels
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
                "checkpoint": str(args.checkpoint),
                "checkpoint_folder": evaluated,
                "ann_file": str(ann), "merged": model.merged,
                "views": cfg.eval.num_clips * cfg.eval.num_crops,
                "world_size": info.world_size, "eval_time_s": dt})
            _print_metrics(res, out)
    finally:
        zdist.cleanup(info)
    return 0


def default_eval_file(model: str) -> Path:
    """Where ``zeroi2v eval MODEL`` writes its results by default, and ``push MODEL`` finds them:
    ``eval.json`` beside the model, or ``RUN/eval_best.json`` for a run's checkpoint ``RUN/best``
    (checkpoint folders are deleted as training goes on)."""
    from .train.checkpoint import CHECKPOINTS, run_folder_of

    src = Path(model)
    folder = src if src.is_dir() else src.parent
    run = run_folder_of(folder)
    if run is None and (folder / "last").exists() and (folder / CHECKPOINTS).is_dir():
        run, folder = folder, folder / "last"  # a run's folder: its last checkpoint
    return run / f"eval_{folder.name}.json" if run is not None else folder / "eval.json"


def _evaluated_folder(model: str) -> Optional[str]:
    """The folder a local MODEL resolves to (``RUN/best`` -> ``RUN/checkpoints/epoch_N``):
    recorded with the results, so results of an older ``best`` are not taken for the new one."""
    from .train.checkpoint import checkpoint_folder

    if _is_hub_id(model):
        return None
    p = Path(model)
    return str(checkpoint_folder(p) if p.is_dir() else p.resolve().parent)


def _eval_out(args) -> Path:
    """The results JSON of ``eval`` (its siblings share the stem), checked like every --out;
    the default (:func:`default_eval_file`) is the evaluation's own and is replaced (for a
    model on the Hub: ``./eval.json``, checked like an --out)."""
    out = Path(args.out) if args.out is not None else None
    if out is None and _is_hub_id(args.checkpoint):  # nothing is written into the Hub's cache
        out = Path("eval.json")
    elif out is None:
        return default_eval_file(args.checkpoint)
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


def cmd_predict(args) -> int:
    import torch

    from .train.build import video_views
    from .train.runtime import amp_dtype, autocast

    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    model, cfg = _load_model_for(args)
    names = _class_names(args.class_names, model)
    device = _device()
    model.to(device).eval()
    views = video_views(args.video, cfg).to(device)
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
    from rich.markup import escape
    from rich.table import Table

    n = int(views.shape[0])
    con = _console()
    con.print(f"{args.video} ({n} view{'s' if n != 1 else ''})", soft_wrap=True, markup=False,
              highlight=False)  # the name whole, as it is
    t = Table()
    t.add_column("rank", justify="right")
    t.add_column("class")
    t.add_column("id", justify="right")
    t.add_column("probability", justify="right")
    for r, row in enumerate(rows, 1):
        t.add_row(str(r), escape(row["label"]), str(row["class_id"]), f"{row['prob']:.4f}")
    con.print(t)
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
    results, found = args.eval_results, default_eval_file(args.model)
    if results is None and found.is_file():
        from .safe_io import load_json, read_text

        doc = load_json(read_text(found, "results file"), str(found))
        evaluated = doc.get("checkpoint_folder") if isinstance(doc, dict) else None
        results = doc if isinstance(doc, dict) else found  # (read once; a non-dict refused there)
        pushed = _evaluated_folder(args.model)
        if evaluated is not None and evaluated != pushed:
            print(f"note: {found} evaluated {evaluated}, not the {pushed} pushed now: left out "
                  f"of the card (zeroi2v eval {args.model} writes new ones)", flush=True)
            results = None
    info = push_to_hub(model, args.repo_id, run_config=cfg if art.run_config_file else None,
                       eval_results=results, private=args.private or None,
                       revision=args.revision, commit_message=args.message,
                       license=args.license)
    url = getattr(info, "commit_url", None) or getattr(info, "oid", None) or info
    print(f"pushed {art.folder} -> hf-hub:{args.repo_id} ({url}); load it with "
          f"zeroi2v.load_model(\"hf-hub:{args.repo_id}\")")
    return 0


def cmd_prepare(args) -> int:
    from .data.prepare import display_name, prepare_videos
    from .data.prepare_settings import RECORD
    from .data.shard_writer import parse_shard_size, prepare_shards
    from .limits import fmt_bytes

    if args.shard_size is not None and not args.shards:
        raise ValueError("--shard-size sets the size of shards: add --shards")
    common = dict(short_side=args.short_side, fps=args.fps, workers=args.workers, crf=args.crf,
                  progress=not args.no_progress, classes=args.classes)
    if args.shards:
        res = prepare_shards(args.src, args.dst, shard_size=parse_shard_size(args.shard_size),
                             **common)
        leftovers = (f"{res['removed']} temporary files and {res['dropped_shards']} incomplete "
                     "shards") if res["removed"] or res["dropped_shards"] else ""
        _print_prepared(args, res, leftovers, "already in complete shards")
        print(f"{res['num_samples']} videos in {res['shards']} shards ({fmt_bytes(res['bytes'])}); "
              f"index: {res['index']} (set data.train_ann / data.val_ann to it)")
        return 0
    res = prepare_videos(args.src, args.dst, **common)
    if res["failed"] and res["converted"] + res["existing"] == 0:  # (the API returns the list)
        from .data.prepare import FAILED_LIST

        raise ValueError(f"none of the {len(res['failed'])} videos could be read (reasons in "
                         f"{Path(args.dst) / FAILED_LIST})")
    if res["unchecked"]:
        print(f"note: {args.dst} holds videos of an older zeroi2v that did not record its settings, "
              "so they cannot be checked against this command's; they are kept, and this command's "
              f"settings are recorded in {Path(args.dst) / RECORD}")
    leftovers = f"{res['removed']} temporary files" if res["removed"] else ""
    _print_prepared(args, res, leftovers, "already done")
    if res["renamed"]:
        rel, out = res["renamed"][0]
        print(f"{len(res['renamed'])} output names made safe for annotation files (e.g. "
              f"{display_name(rel)} -> {out})")
    if res["annotations"]:
        print(f"annotation file: {res['annotations']} (classes: {res['classes']})")
    return 0


def _print_prepared(args, res: dict, leftovers: str, existing: str) -> None:
    """What prepare (files or shards) did: a lock taken over, leftovers removed, the counts and
    the first skipped inputs."""
    from .data.prepare import FAILED_LIST, display_name

    if res["took_over"]:
        rec = res["took_over"]
        print(f"took over the lock of a run that stopped without releasing it (pid "
              f"{rec.get('pid')} on {rec.get('host')}, since {rec.get('started')})")
    if leftovers:
        print(f"removed {leftovers} of interrupted runs")
    failed, skipped = res["failed"], res["skipped"]
    total = res["converted"] + res["existing"] + len(failed) + len(skipped)
    odd = f", {len(skipped)} not regular files" if skipped else ""
    print(f"prepared {res['converted']} videos, {res['existing']} {existing}, {len(failed)} "
          f"unreadable{odd}, of {total} under {args.src}")
    for rel, reason in (failed + skipped)[:10]:
        print(f"  skipped: {display_name(rel)} ({reason})")
    if failed or skipped:
        print(f"  full list: {Path(args.dst) / FAILED_LIST}")
    if res.get("upscaled"):
        print(f"note: {res['upscaled']} of the {res['converted']} videos converted were smaller "
              f"than --short-side {args.short_side} and were scaled up to it (more pixels, no "
              "more detail; a smaller --short-side keeps them as they are)")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "predict": cmd_predict,
            "demo": cmd_demo, "config": cmd_config, "import-official": cmd_import_official,
            "export": cmd_export, "prepare": cmd_prepare, "push": cmd_push}
