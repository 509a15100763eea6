"""zeroi2v 0.1's pickled ``.pth`` files (training checkpoints and ``merge`` outputs), read
without running code and turned into a model of today's layout (``zeroi2v convert``)."""
from __future__ import annotations

import copy
import os
from typing import Optional

import torch

from ..files import PathLike, check_state_dict, read_checkpoint
from ..models.config import ADAPTER_NAMES
from ..models.families import rename_old_adapter_keys
from ..models.merge import merge_adapters
from ..models.video_vit import ZeroI2VViT, load_image_weights
from .build import model_config

OLD_FORMATS = ("zeroi2v-train", "zeroi2v-merged")


def convert_v1(path: PathLike, pretrained: Optional[str] = None) -> tuple[ZeroI2VViT, dict]:
    """``(model, run config)`` from a zeroi2v 0.1 ``.pth``. The file is unpickled by the
    restricted reader (:func:`zeroi2v.files.read_checkpoint`): objects other than tensors and
    plain values become inert placeholders, so nothing in it runs."""
    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or obj.get("format") not in OLD_FORMATS:
        raise ValueError(f"{path} is not a zeroi2v 0.1 checkpoint (no format "
                         f"{' / '.join(OLD_FORMATS)})")
    try:
        cfg = copy.deepcopy(obj["config"])
        mcfg = dict(cfg["model"])
        num_classes = int(obj["num_classes"])
        state = obj["model"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: damaged zeroi2v 0.1 checkpoint ({type(e).__name__}: {e})") from None
    merged = obj["format"] == "zeroi2v-merged"
    full = bool(obj.get("model_full", merged))
    names = obj.get("class_names")
    names = [str(n) for n in names] if isinstance(names, (list, tuple)) and \
        len(names) == num_classes else None
    try:
        absent = {(int(i), str(n)) for i, n in mcfg.pop("absent_adapters", None) or ()}
        config = model_config(mcfg, num_classes, names)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                                  for v in state.values()):
            raise TypeError("its model state is not a dict of tensors")
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: damaged zeroi2v 0.1 checkpoint ({type(e).__name__}: {e})") \
            from None
    cfg["model"] = mcfg
    if absent:
        config = config.replace(adapters=tuple(
            tuple(n for n in ADAPTER_NAMES if (i, n) not in absent) for i in range(_depth(state))))
    model = ZeroI2VViT.from_config(config)
    state = rename_old_adapter_keys(state, model.backbone.blocks)
    if not full:
        base = pretrained or mcfg.get("pretrained")
        if not base or not os.path.isfile(base):
            raise FileNotFoundError(
                f"{path} holds only the trainable tensors; the frozen backbone comes from the "
                f"pretrained file {base!r}, which is not found: pass --pretrained")
        load_image_weights(model.backbone, base)
    if merged:
        model = merge_adapters(model, inplace=True)
        # 0.1 added a bias only where an adapter was folded; today's merge gives every layer of
        # that kind one (zeros), so fill those in
        for k, v in model.state_dict().items():
            if k.endswith(".bias") and k not in state:
                state[k] = torch.zeros_like(v)
    own = model.state_dict()
    if not full:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        own = {k: v for k, v in own.items() if k in trainable}
    check_state_dict(own, state, str(path), what="the model its config describes")
    with torch.no_grad():
        model.load_state_dict(state, strict=full)
    return model.eval(), cfg


def _depth(state: dict) -> int:
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("backbone.blocks.")}
    return max(blocks) + 1 if blocks else 0
