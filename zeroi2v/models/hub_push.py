"""Publishing a model on the Hugging Face Hub: the saved folder, a generated model card, one
upload.

::

    model.push_to_hub("ORG/NAME", run_config=cfg, eval_results="OUT/eval.json")
    zeroi2v.load_model("hf-hub:ORG/NAME")          # anywhere: the same checks as a local folder

What is uploaded is exactly :meth:`~zeroi2v.ZeroI2VViT.save_pretrained`'s folder (``config.json``
with the weights' SHA-256, ``model.safetensors``; ``run_config.yaml`` when the run's config is
given, so ``zeroi2v eval`` uses the data pipeline the model was trained with) plus ``README.md``,
the card. The run config loses its local paths (data files, output folder, a local pretrained
file): they mean nothing elsewhere and say things about the machine they came from.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from ..offsets import PRESETS
from .config import ZeroI2VConfig
from .hub import HUB_PREFIX, HubRef

PAPER = "https://arxiv.org/abs/2310.01324"
#: Run-config keys that hold paths of the machine a model was trained on (dropped on upload).
LOCAL_PATH_KEYS = {"data": ("root", "train_ann", "val_ann", "test_ann", "val_root",
                            "class_names"),
                   "train": ("out_dir",)}


def push_to_hub(model, repo_id: str, *, run_config=None, eval_results=None,
                private: Optional[bool] = None, revision: Optional[str] = None,
                commit_message: Optional[str] = None, license: Optional[str] = None,
                token: Optional[str] = None, api=None):
    """Upload ``model`` to the model repository ``repo_id`` (``ORG/NAME``; created if needed).

    Args:
        model: a :class:`~zeroi2v.ZeroI2VViT`, or a saved model folder (then loaded with every
            check of :func:`zeroi2v.load_model`; its ``run_config.yaml`` and an ``eval.json``
            beside the weights are used when the arguments below are not given; the results
            ``zeroi2v eval RUN/best`` keeps beside the run, ``RUN/eval_best.json``, are found by
            ``zeroi2v push`` only: pass them here as ``eval_results``).
        run_config: the training run's config (a ``RunConfig``, a dict or a YAML file): written
            as ``run_config.yaml`` (without local paths) and summarised in the card.
        eval_results: the results of ``zeroi2v eval`` (its JSON file or the dict): in the card.
        private, revision, commit_message, token: as ``huggingface_hub.HfApi``'s
            ``create_repo`` / ``upload_folder``; ``license``: the card's licence (default: the
            image weights' own licence when timm states it).
        api: an ``HfApi``-like object (tests); default ``HfApi(token=token)``.

    Returns what ``upload_folder`` returns (the commit's information).
    """
    from .artefact import CONFIG_FILE, RUN_CONFIG_FILE, model_from_artefact, read_artefact
    from .hub import parse_hub_id

    ref = parse_hub_id(f"{HUB_PREFIX}{repo_id}")
    if ref.revision is not None:
        raise ValueError(f"push_to_hub: {repo_id!r}: pass the branch as revision=, not in the id")
    if not hasattr(model, "save_pretrained"):  # a saved folder: loaded and checked like any
        folder = Path(model)
        art = read_artefact(folder)
        model = model_from_artefact(art)  # (the folder is read and checked once)
        if run_config is None and art.run_config_file is not None:
            run_config = art.run_config_file
        if eval_results is None and (art.folder / "eval.json").is_file():
            eval_results = art.folder / "eval.json"
    run_config = _public_run_config(_as_dict(run_config, "run_config"))
    eval_results = _as_dict(eval_results, "eval_results")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="zeroi2v-push-") as tmp:
        folder = Path(tmp)
        model.save_pretrained(folder, run_config=run_config)
        doc = json.loads((folder / CONFIG_FILE).read_text())
        card = model_card(model.config, repo_id=ref.repo_id, run_config=run_config,
                          eval_results=eval_results, license=license,
                          parameters=sum(p.numel() for p in model.parameters()),
                          weights_sha256=doc["artefact"].get("weights_sha256"),
                          has_run_config=(folder / RUN_CONFIG_FILE).is_file())
        (folder / "README.md").write_text(card)
        api.create_repo(ref.repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(ref.repo_id, branch=revision, repo_type="model", exist_ok=True)
        return api.upload_folder(
            repo_id=ref.repo_id, folder_path=str(folder), repo_type="model", revision=revision,
            commit_message=commit_message or f"zeroi2v model: {model.config.summary()}")


def _as_dict(x, what: str) -> Optional[dict]:
    """A dict from a dict, an object with ``to_dict`` (a ``RunConfig``), or a JSON/YAML file."""
    if x is None:
        return None
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if isinstance(x, Mapping):
        return json.loads(json.dumps(dict(x), default=str))  # plain values, a copy
    if isinstance(x, (str, os.PathLike)):
        from ..safe_io import load_json, load_yaml, read_text

        p = Path(x)
        if not p.exists():
            raise FileNotFoundError(f"{what}: file not found: {p}")
        text = read_text(p, f"{what} file")  # bounded; JSON and YAML nesting bounded too
        d = load_json(text, str(p)) if p.suffix == ".json" else load_yaml(text, str(p))
        if not isinstance(d, dict):
            raise ValueError(f"{what}: {p} does not hold a mapping")
        return d
    raise TypeError(f"{what}: a dict, a RunConfig or a file path, got {type(x).__name__}")


def _public_run_config(cfg: Optional[dict]) -> Optional[dict]:
    if cfg is None:
        return None
    cfg = json.loads(json.dumps(cfg, default=str))
    for sec, keys in LOCAL_PATH_KEYS.items():
        for k in keys:
            if isinstance(cfg.get(sec), dict) and k in cfg[sec]:
                cfg[sec][k] = None if k != "out_dir" else "work_dirs/run"
    model = cfg.get("model")
    if isinstance(model, dict) and isinstance(model.get("pretrained"), str) and \
            not model["pretrained"].startswith(HUB_PREFIX):
        model["pretrained"] = None  # a local file: config.json's pretrained_source names it
    return cfg


# ----------------------------------------------------------------------------- the card


def _preset_of(offsets) -> Optional[str]:
    return next((n for n, p in PRESETS.items() if tuple(p) == tuple(offsets)), None)


def _weights_line(src: Optional[Mapping[str, Any]]) -> Optional[str]:
    if not src:
        return None
    sha = f", SHA-256 `{src['sha256']}`" if src.get("sha256") else ""
    if src.get("repo_id"):
        at = f" at commit `{src['revision']}`" if src.get("revision") else ""
        tag = f"timm's `{src['timm_name']}`: " if src.get("timm_name") else ""
        return (f"{tag}[`{src['repo_id']}`](https://huggingface.co/{src['repo_id']}) "
                f"`{src['filename']}`{at}{sha}")
    return f"the file `{src.get('file')}`{sha}"


def _base_model(src: Optional[Mapping[str, Any]]) -> Optional[str]:
    return src.get("repo_id") if src else None


def _timm_license(config: ZeroI2VConfig) -> Optional[str]:
    src = config.pretrained_source or {}
    name = src.get("timm_name")
    if not name:
        return None
    try:
        from timm.models import get_pretrained_cfg

        return getattr(get_pretrained_cfg(name), "license", None)
    except Exception:  # noqa: BLE001 - a card without a licence line is still a card
        return None


def model_card(config: ZeroI2VConfig, *, repo_id: str, run_config: Optional[dict] = None,
               eval_results: Optional[dict] = None, license: Optional[str] = None,
               parameters: Optional[int] = None, weights_sha256: Optional[str] = None,
               has_run_config: bool = False) -> str:
    """The ``README.md`` of a model repository: what the model is (method, backbone, image
    weights, frames, classes, head offsets, merged or not), how to load it, and how it was
    trained and evaluated where ``run_config`` / ``eval_results`` say so."""
    c = config
    hub_id = str(HubRef(repo_id))
    license = license or _timm_license(c)
    meta = ["---", "library_name: zeroi2v", "pipeline_tag: video-classification",
            "tags:", "- zeroi2v", "- video-classification", "- timm"]
    if license:
        meta.append(f"license: {license}")
    if _base_model(c.pretrained_source):
        meta.append(f"base_model: {_base_model(c.pretrained_source)}")
    meta.append("---")
    kw = json.dumps(dict(c.timm_kwargs or {}), separators=(", ", ": "))
    offsets = list(c.head_offsets)
    preset = _preset_of(offsets)
    temporal = sum(1 for d in offsets if d)
    rows = [("backbone", f"timm `{c.model_name}`" + (f" with `{kw}`" if c.timm_kwargs else "")),
            ("image weights", _weights_line(c.pretrained_source) or "not recorded"),
            ("frames per clip", str(c.num_frames))]
    img = (c.timm_kwargs or {}).get("img_size")
    if img is not None:
        rows.append(("image size", str(img)))
    names = list(c.class_names or [])
    shown = ", ".join(names[:10]) + (f", … ({len(names) - 10} more)" if len(names) > 10 else "")
    rows.append(("classes", f"{c.num_classes}" + (f": {shown}" if names else "")))
    rows.append(("head offsets", f"`{offsets}`" + (f" (preset `{preset}`)" if preset else "")
                 + f": {temporal} of {len(offsets)} heads attend to another frame"))
    if c.merged:
        rows.append(("adapters", "merged: folded into the frozen linears, so the backbone is a "
                                 "plain timm ViT (same inference cost as the image model)"))
    else:
        n = "four per block" if c.adapters is None else \
            f"{sum(len(r) for r in c.adapters)} in {len(c.adapters)} blocks"
        rows.append(("adapters", f"kept ({n}; ratio {c.adapter_ratio}, scale "
                                 f"{c.adapter_scale}): fine-tunable; `zeroi2v merge` folds them"))
    if parameters:
        rows.append(("parameters", f"{parameters:,}"))
    if weights_sha256:
        rows.append(("`model.safetensors` SHA-256", f"`{weights_sha256}`"))

    out = meta + [
        "", f"# {repo_id}", "",
        f"A video classifier made with zeroi2v from the image model "
        f"`{c.model_name}`: [ZeroI2V]({PAPER}) (Li, Zhu & Wang, ECCV 2024) lets some attention "
        "heads read keys and values of a neighbouring frame (spatial-temporal dual-headed "
        "attention, STDHA) and trains linear adapters beside the frozen image weights, which "
        "are folded into them afterwards: the deployed model costs what the image model costs.",
        "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", "## Use", "", "```python", "import torch", "import zeroi2v", "",
            f'model = zeroi2v.load_model("{hub_id}")   # eval mode; checked before use',
            f"video = torch.randn(1, 3, {c.num_frames}, "
            f"{_size(img)}, {_size(img)})   # (B, C, T, H, W)",
            "logits = model(video)", "```", "", "```bash",
            f"zeroi2v predict {hub_id} clip.mp4", f"zeroi2v eval {hub_id} --ann test.txt --root videos/",
            ("" if c.merged else f"zeroi2v merge {hub_id} --out merged/\n")
            + f"zeroi2v export {hub_id} --out model.onnx", "```", "",
            "Loading runs no code from the repository: `config.json` and `model.safetensors` are "
            "data, and zeroi2v checks the tensors' names, shapes and dtypes, the SHA-256 that "
            "`config.json` records and that every weight is finite before the first forward. "
            "A revision is pinned with `hf-hub:ORG/NAME@REVISION`; `HF_HUB_OFFLINE=1` loads from "
            "the local cache."]
    if c.merged:
        out += ["", "The backbone alone loads into timm (`strict=True`); timm does not do "
                "STDHA, so this gives per-frame image features, not the video model:", "",
                "```python", "import timm, json", "from huggingface_hub import hf_hub_download",
                "from safetensors.torch import load_file", "",
                f'cfg = json.load(open(hf_hub_download("{repo_id}", "config.json")))',
                'vit = timm.create_model(cfg["model_name"], num_classes=0, **cfg["timm_kwargs"])',
                f'sd = load_file(hf_hub_download("{repo_id}", "model.safetensors"))',
                'vit.load_state_dict({k[9:]: v for k, v in sd.items() if k.startswith("backbone.")})',
                "```"]
    out += _training(run_config, has_run_config)
    out += _evaluation(eval_results)
    out += ["", "## Citation", "", "```bibtex",
            "@inproceedings{li2024zeroi2v,",
            "  title={ZeroI2V: Zero-Cost Adaptation of Pre-trained Transformers from Image to "
            "Video},",
            "  author={Li, Xinhao and Zhu, Yuhan and Wang, Limin},",
            "  booktitle={European Conference on Computer Vision (ECCV)},", "  year={2024}", "}",
            "```", ""]
    return "\n".join(out)


def _size(img) -> int:
    if isinstance(img, (list, tuple)):
        return int(img[0])
    return int(img) if img else 224


def _training(cfg: Optional[dict], has_file: bool) -> list[str]:
    if not cfg:
        return ["", "## Training", "", "Not recorded with this upload."]
    m, d, t = (cfg.get(k) or {} for k in ("model", "data", "train"))
    rows = []
    if t:
        rows.append(("schedule", f"{t.get('epochs')} epochs, AdamW, lr {t.get('lr')} "
                     f"(reference batch {t.get('ref_batch_size')}"
                     f"{', scaled with the batch' if t.get('scale_lr') else ''}), weight decay "
                     f"{t.get('weight_decay')}, {t.get('warmup_epochs')} warm-up epochs"))
        rows.append(("batch", f"{t.get('batch_size')} per process x {t.get('accum_steps')} "
                     "accumulation steps"))
        rows.append(("precision", str(t.get("amp"))))
        if t.get("label_smoothing"):
            rows.append(("label smoothing", str(t.get("label_smoothing"))))
    if m:
        rows.append(("trained", "the whole ViT" if m.get("train_backbone") else
                     "adapters, temporal embedding, final norm and head (frozen backbone)"))
    if d:
        sampling = (f"dense, {m.get('num_frames')} frames every {d.get('frame_interval')}"
                    if d.get("sampling") == "dense" else
                    f"uniform (one frame from each of {m.get('num_frames')} segments)")
        rows.append(("sampling", sampling))
        aug = [f"RandAugment {list(d['rand_augment'])}" if d.get("rand_augment") else None,
               "horizontal flip" if d.get("flip") else None,
               f"random erasing {d['random_erasing']}" if d.get("random_erasing") else None]
        rows.append(("input", f"short side {d.get('short_side')}, {d.get('size')} px crops; "
                     + (", ".join(a for a in aug if a) or "no augmentation")))
    out = ["", "## Training", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if has_file:
        out += ["", "`run_config.yaml` holds the whole run config (local paths removed); "
                "`zeroi2v eval` takes the test-time pipeline from it."]
    return out


def _evaluation(res: Optional[dict]) -> list[str]:
    if not res or "top1" not in res:
        return []
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    cols = [("top-1 (%)", res.get("top1")), ("top-5 (%)", res.get("top5")),
            ("mean class acc. (%)", res.get("mean_class_acc")),
            ("videos", res.get("num_samples")), ("views", res.get("views"))]
    cols = [(k, v) for k, v in cols if number(v)]  # a hand-edited file: only numbers shown
    ann = res.get("ann_file") if isinstance(res.get("ann_file"), str) else None
    out = ["", "## Evaluation", "",
           "| " + " | ".join(k for k, _ in cols) + " |",
           "|" + "---|" * len(cols),
           "| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for _, v in cols)
           + " |", ""]
    where = f" on `{Path(ann).name}`" if ann else ""
    merged = {True: " (merged model)", False: " (adapters kept)"}.get(res.get("merged"), "") \
        if isinstance(res.get("merged"), bool) else ""
    skipped = res.get("num_skipped") if number(res.get("num_skipped")) else 0
    out.append(f"Measured with `zeroi2v eval`{where}{merged}"
               + (f"; {skipped} unreadable videos left out." if skipped else "."))
    return out


__all__ = ["push_to_hub", "model_card", "LOCAL_PATH_KEYS"]
