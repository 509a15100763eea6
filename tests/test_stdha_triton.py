"""Triton STDHA kernels (zeroi2v.kernels.stdha) against ``stdha_reference`` on float64.

Without a GPU the kernels run through the Triton interpreter on CPU tensors (TRITON_INTERPRET=1,
set by the root conftest), so the CPU cases are small. ``@pytest.mark.gpu`` tests cover the full
shape grid, determinism and torch.compile with Inductor.
"""
import math

import pytest
import torch

ks = pytest.importorskip("zeroi2v.kernels.stdha")

from zeroi2v.offsets import source_frames  # noqa: E402
from zeroi2v.ops import stdha as ops  # noqa: E402
from zeroi2v.ops.stdha import stdha_attention, stdha_reference  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")

# ‖out − ref‖ / ‖ref‖ bounds (reference: float64 on the same, upcast, inputs).
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
SMALL_BLOCKS = dict(
    fwd=dict(BLOCK_M=16, BLOCK_N=16),
    bwd_pre=dict(BLOCK_M=16),
    bwd_dq=dict(BLOCK_M=16, BLOCK_N=16),
    bwd_dkdv=dict(BLOCK_M=16, BLOCK_N=16),
)


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 bounds assume IEEE fp32 dots (the kernel uses tf32 only if the user opted in)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def rel(a, r, floor=0.0):
    a, r = a.double(), r.double()
    return ((a - r).norm() / max(r.norm().item(), floor, 1e-300)).item()


def make_qkv(B, T, H, N, D, dtype, layout, device=DEV, seed=0):
    """Leaf tensor(s) and q, k, v views in (B*T, H, N, D) layout.

    layout: "fused"  — views of one qkv projection output (B*T, N, 3, H, D) (non-contiguous);
            "contig" — three contiguous tensors;
            "mixed"  — q contiguous, k with a non-unit last-dim stride, v transposed storage.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    BT = B * T
    if layout == "fused":
        qkv = torch.randn(BT, N, 3, H, D, generator=g).to(device, dtype).requires_grad_()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return (qkv,), (q, k, v)
    if layout == "contig":
        leaves = tuple(torch.randn(BT, H, N, D, generator=g).to(device, dtype).requires_grad_()
                       for _ in range(3))
        return leaves, leaves
    assert layout == "mixed"
    ql = torch.randn(BT, H, N, D, generator=g).to(device, dtype).requires_grad_()
    kl = torch.randn(BT, H, D, N, generator=g).to(device, dtype).requires_grad_()
    vl = torch.randn(BT, N, H, D, generator=g).to(device, dtype).requires_grad_()
    return (ql, kl, vl), (ql, kl.transpose(-1, -2), vl.transpose(1, 2))


def reference_views(leaves, layout):
    """Same views as make_qkv, built on float64 copies of the leaves."""
    ref_leaves = tuple(x.detach().double().requires_grad_() for x in leaves)
    if layout == "fused":
        return ref_leaves, ref_leaves[0].permute(2, 0, 3, 1, 4).unbind(0)
    if layout == "contig":
        return ref_leaves, ref_leaves
    ql, kl, vl = ref_leaves
    return ref_leaves, (ql, kl.transpose(-1, -2), vl.transpose(1, 2))


def split_grads(leaves, layout):
    if layout == "fused":
        g = leaves[0].grad
        return g[:, :, 0], g[:, :, 1], g[:, :, 2]
    return tuple(x.grad for x in leaves)


def check_against_reference(B, T, H, N, D, offsets, dtype, layout, device=DEV, seed=0,
                            backward=True):
    leaves, (q, k, v) = make_qkv(B, T, H, N, D, dtype, layout, device, seed)
    assert q.shape == (B * T, H, N, D)
    out = stdha_attention(q, k, v, T, offsets, backend="triton")
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    ref_leaves, (rq, rk, rv) = reference_views(leaves, layout)
    ref = stdha_reference(rq, rk, rv, T, offsets)
    tol = TOL[dtype]
    assert torch.isfinite(out).all()
    assert rel(out, ref) < tol, ("out", rel(out, ref))
    if not backward:
        return
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=gen).to(device, dtype)
    out.backward(dout)
    ref.backward(dout.double())
    grads = split_grads(leaves, layout)
    ref_grads = split_grads(ref_leaves, layout)
    # dq/dk vanish in exact arithmetic when N == 1 (softmax over one key): floor the denominator.
    floor = 1e-2 * max(r.norm().item() for r in ref_grads)
    for name, a, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(a).all(), name
        assert rel(a, r, floor) < tol, (name, rel(a, r, floor))


def _offsets(T, H, seed):
    """Random offsets in [-(T-1), T-1] with the extremes first (boundary cases)."""
    if T == 1:
        return (0,) * H
    g = torch.Generator().manual_seed(seed)
    rnd = torch.randint(-(T - 1), T, (H,), generator=g).tolist()
    fixed = [T - 1, -(T - 1), 1, -1]
    return tuple(fixed[:H] + rnd[len(fixed):]) if H <= len(fixed) else tuple(fixed + rnd[4:])


# ----------------------------------------------------------------------------- interpreter / CPU

# id: (B, T, H, N, D, offsets, dtype, layout, small_blocks)
CPU_CASES = {
    "T1-spatial-f32": (2, 1, 2, 17, 64, (0, 0), torch.float32, "fused", False),
    "T2-pm1-f32": (2, 2, 2, 17, 64, (1, -1), torch.float32, "fused", False),
    "T8-extremes-f32-d32": (1, 8, 6, 17, 32, _offsets(8, 6, seed=8), torch.float32, "fused",
                            False),
    "N1-f16": (1, 2, 2, 1, 64, (1, -1), torch.float16, "fused", False),
    "H12-bf16-d32": (1, 2, 12, 5, 32, _offsets(2, 12, seed=12), torch.bfloat16, "fused", False),
    "N40-blocks16-f16": (1, 3, 2, 40, 64, (2, -1), torch.float16, "fused", True),
    "N32-even-blocks16-f32": (1, 2, 2, 32, 64, (1, 0), torch.float32, "fused", True),
    "T8-bf16": (1, 8, 2, 17, 64, (5, -6), torch.bfloat16, "fused", False),
    "D80-contig-f32": (1, 2, 2, 17, 80, (1, 0), torch.float32, "contig", False),
    "mixed-strides-f32": (1, 3, 2, 17, 64, (-1, 2), torch.float32, "mixed", False),
    # production block sizes (64) with a masked tail: 197 = 3 * 64 + 5
    "N197-f16": (1, 4, 1, 197, 64, (-3,), torch.float16, "fused", False),
}


@pytest.mark.parametrize("case", list(CPU_CASES), ids=list(CPU_CASES))
def test_matches_reference(case):
    B, T, H, N, D, offsets, dtype, layout, small = CPU_CASES[case]
    if small:
        with ks.block_config(**SMALL_BLOCKS):
            check_against_reference(B, T, H, N, D, offsets, dtype, layout)
    else:
        check_against_reference(B, T, H, N, D, offsets, dtype, layout)


def test_poison_and_lse_and_unread_frames():
    """Every output element is written (NaN-filled buffers), LSE is the reference log-sum-exp,
    frames read by nobody get exactly zero dK/dV, frames read twice get both contributions."""
    B, T, H, N, D = 1, 3, 2, 17, 32
    offsets = (2, -2)  # head 0: frame 2 read by nobody; head 1: frame 0 read by nobody
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(B * T, H, N, D, generator=g).to(DEV) for _ in range(4))
    scale = 0.3
    nan = float("nan")
    out = torch.full_like(q, nan)
    lse = torch.full((B * T, H, N), nan, device=DEV)
    with ks.block_config(**SMALL_BLOCKS):
        ks.stdha_triton_forward(q, k, v, T, offsets, scale, out=out, lse=lse)
        dq, dk, dv = (torch.full_like(q, nan) for _ in range(3))
        delta = torch.full((B * T, H, N), nan, device=DEV)
        ks.stdha_triton_backward(do, q, k, v, out, lse, T, offsets, scale,
                                 dq=dq, dk=dk, dv=dv, delta=delta)
    for name, x in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv),
                    ("delta", delta)):
        assert not torch.isnan(x).any(), f"{name} has unwritten elements"

    # LSE against the reference logits
    src = source_frames(offsets, T)
    for h in range(H):
        rows = src[torch.arange(B * T) % T, h] + (torch.arange(B * T) // T) * T
        logits = (q[:, h].double() @ k[rows.to(DEV), h].double().transpose(-1, -2)) * scale
        assert rel(lse[:, h], torch.logsumexp(logits, -1)) < 1e-6

    # gradients against the float64 reference
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    ref = stdha_reference(qr, kr, vr, T, offsets, scale)
    ref.backward(do.double())
    assert rel(out, ref) < 1e-5
    for a, r in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert rel(a, r) < 1e-5
    # head 0 (d=+2, T=3): s(t) = 0, 1, 0 -> frame 0 read twice, frame 2 never
    # head 1 (d=-2, T=3): s(t) = 2, 1, 2 -> frame 2 read twice, frame 0 never
    assert torch.equal(dk[2, 0], torch.zeros_like(dk[2, 0]))
    assert torch.equal(dv[2, 0], torch.zeros_like(dv[2, 0]))
    assert torch.equal(dk[0, 1], torch.zeros_like(dk[0, 1]))
    assert torch.equal(dv[0, 1], torch.zeros_like(dv[0, 1]))
    assert dv[0, 0].abs().sum() > 0 and dv[2, 1].abs().sum() > 0


def test_deterministic_backward_interpreter():
    leaves, (q, k, v) = make_qkv(1, 2, 2, 17, 32, torch.float32, "fused")
    grads = []
    for _ in range(2):
        leaves[0].grad = None
        stdha_attention(q, k, v, 2, (1, -1), backend="triton").sum().backward()
        grads.append(leaves[0].grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_custom_op_opcheck():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(4, 2, 5, 16, generator=g).to(DEV).requires_grad_() for _ in range(3))
    # AOT dispatch is covered by test_torch_compile_fullgraph_cpu
    torch.library.opcheck(torch.ops.zeroi2v.stdha_triton_fwd.default, (q, k, v, [1, -1], 2, 0.25),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_custom_op_eager_autograd():
    """The torch.library op (what torch.compile traces) against the eager autograd.Function."""
    leaves, (q, k, v) = make_qkv(1, 3, 2, 9, 32, torch.float32, "fused", seed=7)
    qkv = leaves[0]
    out, lse = torch.ops.zeroi2v.stdha_triton_fwd(q, k, v, [2, -1], 3, 0.2)
    assert not lse.requires_grad
    dout = torch.randn_like(out)
    (g_op,) = torch.autograd.grad(out, qkv, dout)
    out_fn = ks.STDHATritonFunction.apply(q, k, v, (2, -1), 3, 0.2)
    (g_fn,) = torch.autograd.grad(out_fn, qkv, dout)
    assert torch.equal(out, out_fn) and torch.equal(g_op, g_fn)
    _, (rq, rk, rv) = reference_views(leaves, "fused")
    assert rel(out, stdha_reference(rq, rk, rv, 3, (2, -1), 0.2)) < 1e-5


def test_torch_compile_fullgraph_cpu():
    """Dynamo + AOTAutograd trace the custom op (fake impl, autograd) without graph breaks."""
    T = 2
    leaves, _ = make_qkv(1, T, 2, 9, 32, torch.float32, "fused")
    qkv = leaves[0]

    def f(x):
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
        return stdha_attention(q, k, v, T, (1, -1), backend="triton")

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(qkv)
    out.square().sum().backward()
    g_compiled = qkv.grad.clone()
    qkv.grad = None
    ref = f(qkv)
    ref.square().sum().backward()
    assert torch.allclose(out, ref, rtol=0, atol=1e-6)
    assert torch.allclose(g_compiled, qkv.grad, rtol=0, atol=1e-6)


def test_dispatch_registration():
    assert "triton" in ops.available_backends()
    b = ops._BACKENDS["triton"]
    assert b.priority == 10
    x = torch.randn(2, 2, 4, 64)
    # auto never picks triton for CPU tensors
    assert not b.supports(x, x, x, False)
    assert ops._pick_backend("auto", x, x, x, False, 0.0).name != "triton"
    if HAS_CUDA:
        y = x.to("cuda", torch.bfloat16)
        assert b.supports(y, y, y, True)
        assert ops._pick_backend("auto", y, y, y, True, 0.0).name == "triton"
        assert not b.supports(y[..., :60], y[..., :60], y[..., :60], True)


def test_bad_inputs():
    x = torch.randn(4, 2, 5, 16, device=DEV)
    with pytest.raises(ValueError):
        ks.stdha_triton_forward(x, x.half(), x, 2, (1, 0), 0.25)
    with pytest.raises(ValueError):
        ks.stdha_triton_forward(x, x, x, 2, (2, 0), 0.25)  # |d| >= T
    with pytest.raises(ValueError):
        ks.stdha_triton_forward(x, x, x, 3, (1, 0), 0.25)  # 4 rows, T = 3
    big = torch.randn(2, 1, 3, 160, device=DEV)
    with pytest.raises(ValueError):
        ks.stdha_triton_forward(big, big, big, 1, (0,), 0.1)
    with pytest.raises(ValueError):
        stdha_attention(x, x, x, 2, (1, 0), backend="triton", dropout_p=0.1)


def test_config_table():
    cfg = ks._config("fwd", 64, 197, 197)
    assert cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N"] >= 16
    assert ks._config("fwd", 64, 1, 1)["BLOCK_M"] == 16
    with ks.block_config(fwd=dict(BLOCK_M=32)):
        assert ks._config("fwd", 64, 197, 197)["BLOCK_M"] == 32
    assert ks._config("fwd", 64, 197, 197) == cfg
    with pytest.raises(ValueError):
        with ks.block_config(nope=dict(BLOCK_M=16)):
            pass


_SM90_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
if "nvidia" not in triton.backends.backends:
    print("SKIP no nvidia backend"); sys.exit(0)
import zeroi2v.kernels.stdha as ks
for t in ("bf16", "fp16"):
    tensors = dict(Q=t, K=t, V=t, O=t, DO=t, DQ=t, DK=t, DV=t, OFF="i32", LSE="fp32", DELTA="fp32")
    for kind, fn in (("fwd", ks._fwd_kernel), ("bwd_pre", ks._bwd_pre_kernel),
                     ("bwd_dq", ks._bwd_dq_kernel), ("bwd_dkdv", ks._bwd_dkdv_kernel)):
        cfg = ks._config(kind, 64, 197, 197)
        consts = dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=cfg.pop("BLOCK_M"))
        if "BLOCK_N" in cfg:
            consts.update(BLOCK_N=cfg.pop("BLOCK_N"), EVEN_N=False, PREC="tf32", UPCAST=False)
        sig = {n: "constexpr" if n in consts else "*" + tensors[n] if n in tensors
               else "fp32" if n.endswith("scale") else "i32" for n in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        assert kind == "bwd_pre" or "wgmma" in k.asm["ptx"], kind
print("OK")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_gpu():
    """The interpreter does not check what the compiler checks (dot shapes/dtypes, layouts):
    compile every kernel for sm_90a (H100) offline, fp16 and bf16, and expect wgmma."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True,
                       text=True, timeout=300)
    if r.returncode == 0 and r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


# ----------------------------------------------------------------------------- GPU


GPU_GRID = [
    (N, T, H, dtype)
    for dtype in (torch.float16, torch.bfloat16)
    for N in (1, 17, 197, 257)
    for T in (1, 2, 8)
    for H in (1, 12, 16)
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "N,T,H,dtype", GPU_GRID,
    ids=[f"N{n}-T{t}-H{h}-{str(d)[6:]}" for n, t, h, d in GPU_GRID],
)
def test_gpu_grid(N, T, H, dtype):
    check_against_reference(2, T, H, N, 64, _offsets(T, H, seed=N * 100 + T * 10 + H), dtype,
                            "fused", device=torch.device("cuda"), seed=N + T + H)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_head_dims(D, dtype):
    check_against_reference(2, 8, 12, 197, D, _offsets(8, 12, seed=D), dtype, "fused",
                            device=torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contig", "mixed"])
def test_gpu_layouts_and_fp32(layout):
    check_against_reference(2, 8, 4, 197, 64, (1, -1, 7, -7), torch.float32, layout,
                            device=torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_deterministic_backward(dtype):
    T, H = 8, 12
    leaves, (q, k, v) = make_qkv(4, T, H, 197, 64, dtype, "fused", device=torch.device("cuda"))
    dout = torch.randn(q.shape, device="cuda", dtype=dtype)
    grads = []
    for _ in range(3):
        leaves[0].grad = None
        stdha_attention(q, k, v, T, "vit_b", backend="triton").backward(dout)
        torch.cuda.synchronize()
        grads.append(leaves[0].grad.clone())
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.gpu
def test_gpu_auto_picks_triton_and_matches_torch():
    leaves, (q, k, v) = make_qkv(2, 8, 12, 197, 64, torch.bfloat16, "fused",
                                 device=torch.device("cuda"))
    assert ops._pick_backend("auto", q, k, v, True, 0.0).name == "triton"
    out = stdha_attention(q, k, v, 8, "vit_b")
    ref = stdha_attention(q, k, v, 8, "vit_b", backend="torch")
    assert rel(out, ref.float()) < 1e-2


@pytest.mark.gpu
def test_gpu_torch_compile_inductor_fullgraph():
    T = 8
    leaves, _ = make_qkv(2, T, 12, 197, 64, torch.bfloat16, "fused", device=torch.device("cuda"))
    qkv = leaves[0]

    def f(x):
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
        return stdha_attention(q, k, v, T, "vit_b", backend="triton") * 2.0

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    out = cf(qkv)
    out.float().square().sum().backward()
    g = qkv.grad.clone()
    qkv.grad = None
    ref = f(qkv)
    ref.float().square().sum().backward()
    assert torch.equal(out, ref)
    assert rel(g, qkv.grad) < 1e-3
