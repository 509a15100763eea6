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
