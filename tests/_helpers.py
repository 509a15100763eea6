"""Helpers the test files share. Imported as ``from _helpers import ...``: pytest's default
(prepend) import mode puts this folder on ``sys.path``, as for ``official_ckpt.py``."""
import torch

#: ‖out − ref‖ / ‖ref‖ bounds of an attention kernel in each input dtype (reference: float64 on
#: the same, upcast, inputs).
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ‖a − b‖ / ‖b‖, computed in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_qkv(bt: int, h: int, n: int, d: int, dtype: torch.dtype = torch.float64,
             device="cpu", seed: int = 0, requires_grad: bool = False, fused: bool = False):
    """Random ``q, k, v`` of shape ``(bt, h, n, d)``, drawn in ``dtype`` on the CPU from a
    generator seeded with ``seed`` (the same values on every device), then moved to ``device``.

    ``fused=False``: three contiguous tensors, each a leaf when ``requires_grad``.
    ``fused=True``: views of one fused qkv activation ``(bt, n, 3, h, d)`` in SDPA layout, as
    inside a ViT block (non-contiguous); with ``requires_grad`` the fused tensor is the leaf.
    """
    gen = torch.Generator().manual_seed(seed)
    if fused:
        qkv = torch.randn(bt, n, 3, h, d, generator=gen, dtype=dtype).to(device)
        return qkv.requires_grad_(requires_grad).permute(2, 0, 3, 1, 4).unbind(0)
    return [torch.randn(bt, h, n, d, generator=gen, dtype=dtype).to(device)
            .requires_grad_(requires_grad) for _ in range(3)]


#: A one-block ViT small enough for training tests (16 px frames, 4 heads).
TINY_VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 4}


def cfg_dict(ds, **sections):
    """A training config over the synthetic dataset ``ds`` (tiny ViT, uniform sampling, no
    workers, no progress bars), with ``sections`` updating its sections."""
    cfg = {
        "model": {"name": "vit_base_patch16_224", "timm_kwargs": dict(TINY_VIT), "num_frames": 4,
                  "head_offsets": [1, -1, 0, 0], "head_dropout": 0.5, "adapter_dropout": 0.1},
        "data": {"root": ds["root"], "train_ann": ds["train"], "val_ann": ds["val"],
                 "sampling": "uniform", "size": 16, "short_side": 16, "rand_augment": [5, 2],
                 "flip": True, "num_workers": 0},
        "eval": {"num_clips": 1, "num_crops": 1, "interval": 1, "batch_size": 4},
        "train": {"epochs": 2, "batch_size": 2, "lr": 1e-3, "scale_lr": False,
                  "warmup_epochs": 0.5, "progress": False, "log_interval": 1},
    }
    for sec, kv in sections.items():
        cfg[sec].update(kv)
    return cfg


def write(path, cfg):
    """``cfg`` as a YAML file at ``path``; returns the path as a string."""
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def synthetic_videos(tmp_path_factory, videos_per_class: int = 4, val_fraction: float = 0.5):
    """The demo's synthetic dataset (2 classes, 8-frame 16 px mp4 files) in a fresh folder:
    ``make_synthetic_dataset``'s dict (``root``, ``train``, ``val`` ...)."""
    from zeroi2v.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_classes=2,
                                  videos_per_class=videos_per_class, num_frames=8, size=16,
                                  seed=0, val_fraction=val_fraction)


def rewrite_zip(path, change=lambda name, data: data, extra=None):
    """Rewrite the zip at ``path`` (a ``torch.save`` file, say): each record becomes
    ``change(name, data)``, bytes or ``(bytes, zipfile compression)``, and the records of
    ``extra`` (``{name: bytes}``) are added."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        records = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w") as z:
        for n, data in list(records.items()) + list((extra or {}).items()):
            new = change(n, data) if n in records else data
            data, kind = new if isinstance(new, tuple) else (new, zipfile.ZIP_STORED)
            z.writestr(n, data, compress_type=kind)


def interrupt_transcode_at(monkeypatch, n: int) -> list:
    """Make ``prepare``'s n-th transcode leave a half-written temporary and raise Ctrl-C (the
    others run); returns the list of sources transcoded so far."""
    from pathlib import Path

    from zeroi2v.data import prepare as prep

    calls, real = [], prep._transcode

    def interrupted(src, tmp, *a):
        calls.append(src)
        if len(calls) == n:
            Path(tmp).write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(src, tmp, *a)

    monkeypatch.setattr(prep, "_transcode", interrupted)
    return calls
