#!/usr/bin/env python3
"""Per-kernel GPU time from an Nsight Compute CSV log.

    ncu --metrics gpu__time_duration.sum --csv --log-file run.csv CMD...
    python3 bench/ncu_summary.py run.csv [--top 30] [--divide N]

Groups the launches by kernel name (template arguments cut off), sums their
gpu__time_duration, and prints the kernels by total time: launches, total
ms, mean us, share of all kernel time.  --divide N reports per-step figures
when the log covers N training steps.  Used by scripts/gpu-check's profile
task (docs/gpu.md)."""
import argparse
import collections
import csv
import re
import sys


def short(name):
    """The kernel's name without its argument list and template arguments."""
    name = re.sub(r"\(.*$", "", name)
    depth, out = 0, []
    for ch in name:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    s = "".join(out).strip()
    return s.split(" ")[-1] if s else name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--divide", type=float, default=1.0)
    a = ap.parse_args()
    total = collections.defaultdict(float)
    count = collections.Counter()
    with open(a.log, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # ncu prints its own ==PROF== lines too
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = row.get("Metric Unit", "ns")
        v = float(row["Metric Value"].replace(",", ""))
        scale = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0}.get(unit, 1e-6)
        k = short(row["Kernel Name"])
        total[k] += v * scale
        count[k] += 1
    if not total:
        print("ncu_summary: no gpu__time_duration rows in", a.log, file=sys.stderr)
        return 1
    all_ms = sum(total.values())
    d = a.divide
    print(f"kernel time {all_ms / d:.2f} ms in {sum(count.values()) / d:.0f} launches (per step: divided by {d:g})")
    print(f"{'kernel':<60} {'launches':>9} {'ms':>9} {'mean us':>9} {'share':>7}")
    for k, v in sorted(total.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"{k[:60]:<60} {count[k] / d:>9.0f} {v / d:>9.3f} {1000 * v / count[k]:>9.1f} {100 * v / all_ms:>6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
