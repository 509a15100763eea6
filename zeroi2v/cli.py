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
Data: ``zeroi2v prepare SRC DST [--short-side 256] [--fps F] [--workers N] [--classes FILE]``
re-encodes a video tree for training (:mod:`zeroi2v.data.prepare`); with ``--shards [--shard-size
1GB]`` into tar shards and an index (:mod:`zeroi2v.data.shard_writer`).

Multi-GPU / multi-node: ``torchrun --nproc_per_node N -m zeroi2v.cli train CONFIG.yaml`` (or
``torchrun ... $(which zeroi2v) train ...``); the same command without torchrun is one process
(CPU: gloo backend when run under torchrun without CUDA).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Optional

from . import settings


def _version() -> str:
    import torch

    from . import __version__

    return f"{__version__} (torch {torch.__version__})"


def _add_common(p: argparse.ArgumentParser, example: str = "train.lr=1e-4") -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value with a dotted key, e.g. --set {example} "
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

    p = sub.add_parser("eval", help="evaluate a saved model or checkpoint (top-1/5, mean class acc)",
                       description="Evaluate MODEL on an annotation file with its run config's "
                                   "test views (eval.num_clips x eval.num_crops): top-1, top-5, "
                                   "mean class accuracy, confusion matrix and per-class tables. "
                                   "Data whose classes.txt numbers the classes otherwise than the "
                                   "model is refused.")
    p.add_argument("checkpoint", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--ann", default=None, help="annotation file (default data.test_ann, then data.val_ann)")
    p.add_argument("--root", default=None, help="video folder (default data.val_root/data.root)")
    _add_common(p, "eval.num_clips=3")
    p.add_argument("--out", default=None, help="results JSON (default: eval.json beside the "
                                                  "model; RUN/eval_best.json for RUN/best); with "
                                                  "_confusion.png, _per_class.csv/md")
    p.add_argument("--overwrite", action="store_true", help="replace the results of --out")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--class-names", default=None, help="text file, one class name per line")
    p.add_argument("--merge", action="store_true", help="merge the adapters before evaluating")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("merge", help="fold the adapters into the frozen linears (a plain ViT)",
                       description="Fold every adapter into the linear it adapts (float64) and "
                                   "save a plain timm ViT with STDHA: the same outputs (the "
                                   "error is printed), no extra parameters or compute.")
    p.add_argument("checkpoint", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--out", required=True, help="folder for the merged model (new or empty)")
    p.add_argument("--pretrained", default=None,
                   help="image weights of a checkpoint that holds only its trainable tensors")

    p = sub.add_parser("predict", help="classify one video file",
                       description="Classify one video: its test views as evaluation makes "
                                   "them, softmax averaged over the views, the top classes.")
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("video", help="a video file (any name; decoded as the run config says)")
    p.add_argument("--topk", type=int, default=5, help="classes to show (default 5)")
    p.add_argument("--class-names", default=None, help="text file, one class name per line")
    _add_common(p, "eval.num_clips=3")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("demo", help="offline demo: synthetic videos, image-only vs STDHA, merge",
                       description="Write a synthetic video dataset, train a small ViT twice "
                                   "(image-only vs STDHA head offsets), merge the STDHA model "
                                   "and print accuracy, parameters and throughput. No network.")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per model (default 30)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    p.add_argument("--quick", action="store_true", help="an even smaller run (tests)")
    p.add_argument("--train-backbone", action="store_true",
                   help="fine-tune the whole ViT too (default: the paper's recipe, frozen backbone; "
                        "adapters, temporal embedding, final norm and head trained)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    p = sub.add_parser("config", help="print a resolved config",
                       description="Print the config training would use: the defaults, the "
                                   "YAML file and the --set overrides, every key checked.")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: the defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value with a dotted key, e.g. --set train.lr=1e-4")

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
                   help="results JSON of `zeroi2v eval` for the card (default: the file `zeroi2v "
                        "eval MODEL` writes, when there is one)")
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

    _add_prepare_parser(sub)
    for sp in sub.choices.values():
        sp.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also ZEROI2V_DEBUG=1)")
    return ap


def _add_prepare_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prepare", help="re-encode a video tree for training (short side, fps)",
                       description="Re-encode every video under SRC into DST/<same path>.mp4 (H.264): "
                                   "short side resized, optional frame rate; resumable, atomic outputs, "
                                   "unreadable inputs listed in DST/prepare_failed.txt; with class folders "
                                   "also DST/annotations.txt and DST/classes.txt (classes numbered in "
                                   "sorted folder order, or as --classes lists them). The settings are "
                                   "recorded in DST/prepare.json: a rerun with another --short-side, "
                                   "--fps, --crf or --classes is refused. With --shards the videos "
                                   "go into tar shards of --shard-size bytes with the index "
                                   "DST/shards.json instead (resumable and checked the same way).")
    p.add_argument("src", help="folder of videos (class folders: SRC/<class>/<video>)")
    p.add_argument("dst", help="output folder")
    p.add_argument("--short-side", type=int, default=256,
                   help="short side of the outputs (even; default 256)")
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: keep every frame)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--crf", type=int, default=23, help="x264 quality, lower is better (default 23)")
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="number the classes as FILE lists them (one name per line, e.g. the training "
                        "set's DST/classes.txt) instead of in sorted folder order: for a validation or "
                        "test set in a model's class order; every class folder must be listed, and "
                        "DST/classes.txt gets the whole list")
    p.add_argument("--shards", action="store_true",
                   help="write the videos into tar shards with an index, DST/shards.json, instead of "
                        "one file each (needs class folders; set data.train_ann to the index)")
    p.add_argument("--shard-size", default=None, metavar="SIZE",
                   help="with --shards: bytes per shard, e.g. 1GB (default), 500MB, 2GiB")
    p.add_argument("--no-progress", action="store_true")
    return p


def _user_errors() -> tuple:
    """Exceptions that mean a user mistake (a file, a setting, a model or video that does not fit),
    reported as one line; anything else is a bug and keeps its traceback."""
    from .data.decoders import VideoDecodeError
    from .errors import MissingDependencyError, UnsupportedModelError

    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, UnsupportedModelError, VideoDecodeError,
            MissingDependencyError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # `zeroi2v` alone: what it can do
        parser.print_help(sys.stderr)
        return 2
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command, as its other errors are
        print(f"zeroi2v {args.command}: error: unrecognized arguments: {' '.join(extra)} (see "
              f"zeroi2v {args.command} --help)", file=sys.stderr)
        return 2
    try:
        debug = getattr(args, "debug", False) or settings.debug()
    except ValueError as e:  # a bad ZEROI2V_DEBUG value
        print(f"zeroi2v {args.command}: error: {e}", file=sys.stderr)
        return 2
    try:
        from .commands import COMMANDS

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
