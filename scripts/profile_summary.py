#!/usr/bin/env python3
"""Sums CubeCL's kernel profile (cubecl.toml `[profiling.logger] level = "basic"`) per kernel.

The log lists one `| duration | kernel name` line per launch, in launch order, then a summary
table of the whole run (which mixes in the first launches' compilation). This script splits
the launches into training steps by a marker kernel and sums the kernels of one step:

  python3 scripts/profile_summary.py profile.log --marker FragmentForwardKernel --per-step 2
  python3 scripts/profile_summary.py profile.log.gz --rows 2102:3074

`--marker NAME --per-step K`: a step starts at every K-th launch of a kernel whose name
starts with NAME (e.g. the attention forward, launched once per layer); the last complete
step is summed (`--step I` picks another, 0-based). `--rows A:B` sums launches A..B instead.
`--categories` adds the step's time and launch count per kind of kernel (this library's
attention kernels, Burn's matmuls, reductions, element-wise, copies and slices, others by
name), the breakdown docs/results/toy-lm-h200.md quotes.
"""
import argparse
import collections
import gzip
import re

UNITS = {"s": 1e3, "ms": 1.0, "µs": 1e-3, "us": 1e-3, "ns": 1e-6}
LINE = re.compile(r"\|\s*([\d.]+)(s|ms|µs|us|ns)\s*\|\s*(.*?)\s*$")


def launches(path):
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            m = LINE.match(line)
            if m:
                rows.append((float(m.group(1)) * UNITS[m.group(2)], m.group(3)))
    return rows


def short(name):
    head = name.split("|")[0].strip()
    # Matmul names carry the whole tiling description; keep the family and the hash.
    return head + " " + name[-8:] if head.startswith("MatmulEntry") else head


ATTENTION = ("Fragment", "Mma", "Attn", "Delta", "SumKeyPieces", "SumPartials", "MergeSlots", "GatherTiles")


def category(name):
    """The kind of kernel a launch name belongs to."""
    if name.startswith(ATTENTION):
        return "attention"
    if name.startswith("MatmulEntry"):
        return "matmul"
    if "Reduce" in name:
        return "reduce"
    if name.startswith(("ElemwiseFuse", "KernelBinop", "KernelScalarBinop", "UnaryFloat", "CastElement", "FullKernel")):
        return "elementwise"
    if name.startswith(("CopyKernel", "SliceKernel", "SliceAssignKernel", "GatherKernel", "SelectKernel", "SelectAssignKernel")):
        return "copy/slice"
    return "other: " + name.split("|")[0].split("_")[0].strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--marker")
    ap.add_argument("--per-step", type=int, default=1)
    ap.add_argument("--step", type=int)
    ap.add_argument("--rows")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--categories", action="store_true")
    a = ap.parse_args()
    rows = launches(a.log)
    if a.rows:
        lo, hi = (int(x) for x in a.rows.split(":"))
    elif a.marker:
        marks = [i for i, (_, n) in enumerate(rows) if n.startswith(a.marker)]
        starts = marks[:: a.per_step]
        if len(starts) < 2:
            raise SystemExit(f"fewer than two steps marked by {a.marker!r}")
        steps = list(zip(starts, starts[1:]))
        print("step  launches  kernel ms")
        for i, (s0, s1) in enumerate(steps):
            print(f"{i:4d}  {s1 - s0:8d}  {sum(v for v, _ in rows[s0:s1]):9.2f}")
        lo, hi = steps[a.step if a.step is not None else -1]
    else:
        raise SystemExit("give --marker NAME (with --per-step K) or --rows A:B")
    part = rows[lo:hi]
    total = sum(v for v, _ in part)
    agg = collections.defaultdict(lambda: [0, 0.0])
    for v, n in part:
        agg[short(n)][0] += 1
        agg[short(n)][1] += v
    print(f"\nlaunches {lo}..{hi}: {len(part)} kernels, {total:.2f} ms")
    print(f"{'ms':>9} {'share':>6} {'calls':>5}  kernel")
    for n, (c, v) in sorted(agg.items(), key=lambda x: -x[1][1])[: a.top]:
        print(f"{v:9.2f} {100 * v / total:5.1f}% {c:5d}  {n}")
    if a.categories:
        cats = collections.defaultdict(lambda: [0, 0.0])
        for v, n in part:
            cats[category(n)][0] += 1
            cats[category(n)][1] += v
        print(f"\n{'ms':>9} {'share':>6} {'calls':>5}  category")
        for n, (c, v) in sorted(cats.items(), key=lambda x: -x[1][1]):
            print(f"{v:9.2f} {100 * v / total:5.1f}% {c:5d}  {n}")


if __name__ == "__main__":
    main()
