"""Fraction of useful score work per STDHA kernel at ViT token counts (arithmetic, no GPU).

    python benchmarks/useful_work.py   # prints the table, rewrites benchmarks/results/useful_work.{json,md}

A kernel tiles each (frame, head) score matrix N x N into blocks; padded rows and columns past N
are computed and thrown away. Useful fraction = N^2 / (rows computed x columns computed), from
the launch configs of ``zeroi2v.kernels.stdha_launch`` (head_dim 64) and the tiling of the CUDA kernel
(csrc/stdha_kernel.cuh: 16-row m tiles per warp, 64-key tiles whose last one is cut at 16
columns). "before" is the tiling of the previous revision: ragged ends padded to the full block
(Triton) and no skip of padded 16-row slices (CUDA, 64-row blocks; 128-row blocks pad more).
"""
from __future__ import annotations

import json
import math
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
NS = (197, 257)


def _ceil_to(n: int, b: int) -> int:
    return -(-n // b) * b


def rows() -> list[dict]:
    import zeroi2v.kernels.stdha_launch as ks

    out = []
    for n in NS:
        for kind, label in (("fwd", "triton fwd"), ("bwd_dq", "triton bwd dQ"),
                            ("bwd_dkdv", "triton bwd dK/dV")):
            cfg = ks.launch_config(kind, 64, n, n)
            bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
            # fwd/dq: a program owns BLOCK_M queries and loops over keys in BLOCK_N steps;
            # dK/dV: a program owns BLOCK_N keys and loops over queries in BLOCK_M steps
            now = (ks.tile_extent(n, bm), ks.tile_extent(n, bn))
            before = (_ceil_to(n, bm), _ceil_to(n, bn))
            out.append(dict(kernel=label, N=n, tiles=f"BLOCK_M={bm} BLOCK_N={bn} tail={ks.TAIL}",
                            rows=now[0], cols=now[1], useful=n * n / (now[0] * now[1]),
                            rows_before=before[0], cols_before=before[1],
                            useful_before=n * n / (before[0] * before[1])))
        # CUDA forward: m tiles of 16 rows (dead ones skipped), keys cut at 16 in the last tile
        now = (_ceil_to(n, 16), _ceil_to(n, 16))
        before = (_ceil_to(n, 64), _ceil_to(n, 16))
        out.append(dict(kernel="cuda fwd", N=n, tiles="16-row m tiles, 64-key tiles cut at 16",
                        rows=now[0], cols=now[1], useful=n * n / (now[0] * now[1]),
                        rows_before=before[0], cols_before=before[1],
                        useful_before=n * n / (before[0] * before[1])))
    return out


def markdown(table: list[dict]) -> str:
    lines = [
        "# Useful score work per STDHA kernel (arithmetic)",
        "",
        "Written by `python benchmarks/useful_work.py` from the launch configs (head_dim 64); no",
        "timing. Useful = N² / (rows × columns computed) of each (frame, head) score matrix.",
        "",
        "| kernel | N | tiling | rows × cols computed | useful | before (rows × cols) | useful before |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| {r['kernel']} | {r['N']} | {r['tiles']} | {r['rows']} × {r['cols']} | "
                     f"{r['useful']:.1%} | {r['rows_before']} × {r['cols_before']} | "
                     f"{r['useful_before']:.1%} |")
    return "\n".join(lines) + "\n"


def main():
    table = rows()
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "useful_work.json"), "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    text = markdown(table)
    with open(os.path.join(RESULTS, "useful_work.md"), "w") as f:
        f.write(text)
    print(text)
    assert all(math.isfinite(r["useful"]) for r in table)


if __name__ == "__main__":
    main()
