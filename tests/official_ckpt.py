"""Random weights in the official ZeroI2V (mmaction2) checkpoint layout, for the interop and CLI
tests (a helper module, not a test file)."""
import math

import torch

ADAPTERS = ("T_Adapter_in", "S_Adapter", "MLP_Adapter", "MLP_Adapter_out")


def make_official(width, layers, frames, classes, *, img=32, patch=8, adapters=ADAPTERS, seed=0):
    """Random weights in the official mmaction2 key layout (docs/method.md §6)."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, std=None):
        std = std if std is not None else (1.0 / math.sqrt(shape[-1]) if len(shape) > 1 else 0.1)
        return std * torch.randn(*shape, generator=g)

    def ln(prefix):
        return {prefix + ".weight": 1 + rn(width, std=0.1), prefix + ".bias": rn(width, std=0.1)}

    c, h = width, width // 4
    sd = {
        "backbone.conv1.weight": rn(c, 3, patch, patch, std=0.1),
        "backbone.class_embedding": rn(c, std=0.5),
        "backbone.positional_embedding": rn((img // patch) ** 2 + 1, c, std=0.5),
        "backbone.temporal_embedding": rn(1, frames, c, std=0.5),
        **ln("backbone.ln_pre"), **ln("backbone.ln_post"),
        "cls_head.fc_cls.weight": rn(classes, c, std=0.5), "cls_head.fc_cls.bias": rn(classes),
    }
    for i in range(layers):
        p = f"backbone.transformer.resblocks.{i}."
        sd.update({
            p + "attn.in_proj_weight": rn(3 * c, c), p + "attn.in_proj_bias": rn(3 * c),
            p + "attn.out_proj.weight": rn(c, c), p + "attn.out_proj.bias": rn(c),
            p + "mlp.c_fc.weight": rn(4 * c, c), p + "mlp.c_fc.bias": rn(4 * c),
            p + "mlp.c_proj.weight": rn(c, 4 * c), p + "mlp.c_proj.bias": rn(c),
            **ln(p + "ln_1"), **ln(p + "ln_2"),
        })
        for a in adapters:
            sd.update({p + f"{a}.D_fc1.weight": rn(h, c), p + f"{a}.D_fc1.bias": rn(h),
                       p + f"{a}.D_fc2.weight": rn(c, h), p + f"{a}.D_fc2.bias": rn(c)})
    return sd
