"""Print median-time ratios per benchmark group from a pytest-benchmark JSON file.

    python benchmarks/ratios.py results.json [--baseline sdpa_no_shift --baseline plain_timm_vit]

In every group, each benchmark's median is divided by the median of the group's baseline (the
benchmark whose name contains one of the baseline markers). Paired benchmarks (baseline and
candidate timed back to back in every round) report the median of their per-round ratios.
"""
import argparse
import json
from collections import defaultdict

DEFAULT_BASELINES = ("sdpa_no_shift", "plain_timm_vit", "unfused")


def ratios(data: dict, baselines=DEFAULT_BASELINES) -> list[tuple[str, str, float, float]]:
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    rows = []
    for group, benches in sorted(groups.items(), key=lambda kv: str(kv[0])):
        base = next((b for b in benches if any(m in b["name"] for m in baselines)), None)
        for b in benches:
            med = b["stats"]["median"]
            rows.append((str(group), b["name"], med, med / base["stats"]["median"] if base else float("nan")))
    return rows


def paired(data: dict) -> list[tuple[str, float, float, float, list]]:
    """Rows of the paired benchmarks: median of per-round candidate/baseline ratios."""
    rows = []
    for b in data["benchmarks"]:
        e = b.get("extra_info", {})
        if "paired_ratio_median" in e:
            rows.append((b["name"].replace("test_paired_", ""), e["baseline_median_s"],
                         e["candidate_median_s"], e["paired_ratio_median"], e["paired_ratio_quartiles"]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--baseline", action="append", help="marker of the baseline benchmark name")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    print(f"{'group':32} {'benchmark':58} {'median ms':>10} {'ratio':>7}")
    for group, name, med, r in ratios(data, tuple(args.baseline or DEFAULT_BASELINES)):
        if group.startswith("paired-"):
            continue
        print(f"{group:32} {name:58} {med * 1e3:10.2f} {r:7.3f}")
    rows = paired(data)
    if rows:
        print(f"\n{'paired (candidate / baseline, same round)':46} {'baseline ms':>11} {'cand. ms':>9} "
              f"{'ratio':>7} {'quartiles':>15}")
        for name, base, cand, r, q in rows:
            print(f"{name:46} {base * 1e3:11.2f} {cand * 1e3:9.2f} {r:7.3f} {q[0]:7.3f}-{q[2]:.3f}")


if __name__ == "__main__":
    main()
