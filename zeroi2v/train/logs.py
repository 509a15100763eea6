"""What a run tells the people watching it: ``log.jsonl`` (every record), one line per epoch on
the console, progress (a bar on a terminal, plain periodic lines in a file, as under nohup or
Slurm), ``curves.png`` (loss, accuracy and learning rate, redrawn every epoch) and, when asked,
TensorBoard event files. Only rank 0 writes."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from ..progress import seconds
from ..safe_io import atomic_path
from .runtime import json_default


class JsonlLogger:
    """Append one JSON object per line (rank 0 only); every record gets a wall-clock ``time``."""

    def __init__(self, path: Optional[os.PathLike], enabled: bool = True):
        self.path = Path(path) if path is not None and enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        if self.path is None:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=json_default) + "\n")

    def records(self) -> list[dict]:
        if self.path is None or not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: the rest still counts
                continue
        return out


def epoch_line(epoch: int, epochs: int, rec: dict, val: Optional[dict]) -> str:
    """The one line every epoch prints: loss, accuracy, lr, time, validation, data problems."""
    msg = (f"epoch {epoch}/{epochs}: loss {rec['train_loss']:.4f} acc {rec['train_acc']:.1f}% "
           f"lr {rec['lr']:.3g} {seconds(rec['epoch_time_s'])}")
    if val is not None:
        top5 = f" top5 {val['top5']:.2f}" if "top5" in val else ""
        msg += f" | val top1 {val['top1']:.2f}{top5} mca {val['mean_class_acc']:.2f}"
        if val.get("num_skipped"):
            msg += f" ({val['num_samples']} of {val['num_videos']} videos)"
    msg += (f" | {rec['skipped_videos']} unreadable videos skipped" if rec["skipped_videos"]
            else "")
    msg += f", {rec['short_videos']} short" if rec["short_videos"] else ""
    return msg


def plot_curves(records: list[dict], path: Path) -> Optional[Path]:
    """``curves.png``: training loss (per log interval and per epoch), training and validation
    accuracy, and the learning rate, against the optimiser step. None when there is nothing."""
    def numbers(r, *keys) -> bool:  # log.jsonl is appended to by anyone: only whole records
        return isinstance(r, dict) and all(
            isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for k in keys)

    steps = [r for r in records if numbers(r, "step", "loss", "lr") and r.get("type") == "train"]
    epochs = [r for r in records if numbers(r, "step", "train_loss", "train_acc", "lr")
              and r.get("type") == "epoch"]
    if not steps and not epochs:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6))
    FigureCanvasAgg(fig)
    loss, acc, lr = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    if steps:
        loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6,
                  label="per log interval")
        lr.plot([r["step"] for r in steps], [r["lr"] for r in steps], lw=1)
    if epochs:
        x = [r["step"] for r in epochs]
        loss.plot(x, [r["train_loss"] for r in epochs], "o-", label="epoch mean")
        acc.plot(x, [r["train_acc"] for r in epochs], "o-", label="train")
        val = [(r["step"], r["val"]["top1"]) for r in epochs if numbers(r.get("val"), "top1")]
        if val:
            acc.plot(*zip(*val), "s-", label="validation top-1")
        if not steps:
            lr.plot(x, [r["lr"] for r in epochs], "o-")
    for ax, title in ((loss, "loss"), (acc, "accuracy (%)"), (lr, "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    loss.legend(fontsize=8)
    acc.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return path


class TensorBoard:
    """TensorBoard scalars in ``OUT/tensorboard`` (``train.tensorboard: true``), through
    ``torch.utils.tensorboard``; a no-op when disabled."""

    def __init__(self, folder: Optional[Path]):
        self.writer = None
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder))

    def record(self, rec: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(rec.get("step", 0))
        kind = rec.get("type")
        if kind == "train":
            self.writer.add_scalar("train/loss", rec["loss"], step)
            self.writer.add_scalar("train/lr", rec["lr"], step)
            self.writer.add_scalar("train/clips_per_s", rec["clips_per_s"], step)
        elif kind == "epoch":
            self.writer.add_scalar("epoch/train_loss", rec["train_loss"], step)
            self.writer.add_scalar("epoch/train_acc", rec["train_acc"], step)
            for k in ("top1", "top5", "mean_class_acc"):
                if rec.get("val") and k in rec["val"]:
                    self.writer.add_scalar(f"val/{k}", rec["val"][k], step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_missing() -> Optional[str]:
    """Why ``train.tensorboard: true`` cannot work here, or None."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return ("train.tensorboard: true needs the tensorboard package: pip install "
                "'zeroi2v[tensorboard]' (or set train.tensorboard: false)")
    return None
