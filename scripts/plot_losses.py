#!/usr/bin/env python3
"""Training-loss curves of a `toy-lm compare` results.json as an SVG, with no dependencies
(the GPU machine's output folder may not bring back the PNG the example writes).

    python3 scripts/plot_losses.py RESULTS.json OUT.svg [TITLE]
"""
import json
import sys

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
W, H, L, R, T, B = 720, 420, 60, 130, 40, 50


def smooth(v, half=3):
    return [sum(v[max(0, i - half):i + half + 1]) / len(v[max(0, i - half):i + half + 1]) for i in range(len(v))]


def main():
    src, out = sys.argv[1], sys.argv[2]
    d = json.load(open(src))
    title = sys.argv[3] if len(sys.argv) > 3 else f"{d['task']} at context {d['seq_len']}, batch {d['batch']}"
    runs = [(r["label"], smooth(r["losses"])) for r in d["runs"] if r["losses"]]
    n = max(len(v) for _, v in runs)
    lo = min(min(v) for _, v in runs)
    hi = max(max(v) for _, v in runs)
    sx = lambda i: L + (W - L - R) * i / max(n - 1, 1)
    sy = lambda y: T + (H - T - B) * (hi - y) / max(hi - lo, 1e-9)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
             f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
             f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
             f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">step</text>',
             f'<text x="16" y="{(T + H - B) / 2}" transform="rotate(-90 16 {(T + H - B) / 2})" text-anchor="middle">training loss (smoothed)</text>']
    for k in range(5):
        y = lo + (hi - lo) * k / 4
        parts.append(f'<text x="{L - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
        parts.append(f'<line x1="{L}" y1="{sy(y):.1f}" x2="{W - R}" y2="{sy(y):.1f}" stroke="#ddd"/>')
    for k in range(5):
        i = (n - 1) * k / 4
        parts.append(f'<text x="{sx(i):.1f}" y="{H - B + 16}" text-anchor="middle">{int(i) + 1}</text>')
    for c, (label, v) in enumerate(runs):
        col = COLORS[c % len(COLORS)]
        pts = " ".join(f"{sx(i):.1f},{sy(y):.1f}" for i, y in enumerate(v))
        parts.append(f'<polyline fill="none" stroke="{col}" stroke-width="1.6" points="{pts}"/>')
        parts.append(f'<line x1="{W - R + 12}" y1="{T + 18 * c + 6}" x2="{W - R + 32}" y2="{T + 18 * c + 6}" stroke="{col}" stroke-width="2"/>')
        parts.append(f'<text x="{W - R + 38}" y="{T + 18 * c + 10}">{label}</text>')
    parts.append("</svg>")
    open(out, "w").write("\n".join(parts))


main()
