"""Held-out loss curves of `kantai-batch bench` records as an SVG (no plotting library needed).

python bench/plot.py RECORD.json [RECORD.json ...] --out bench/loss-vs-time.svg [--x seconds|step] [--label NAME ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 800, 420, 60, 210, 30, 45


def curves(paths: list[Path], key: str, x: str) -> list[tuple[str, list[tuple[float, float]]]]:
    found = []
    for path in paths:
        record = json.loads(path.read_text())
        for row in record["results"]:
            points = [(p[x], p[key]) for p in row["curve"] if key in p]
            label = row["name"]
            if label == "job":  # the bench's own row: say which job it was
                label = f"job (batch {row['batch_size']}, {row['mlm_probability']:.0%} masked)"
            found.append((label, points))
    return found


def ticks(low: float, high: float, count: int = 5) -> list[float]:
    step = (high - low) / count
    return [low + i * step for i in range(count + 1)]


def svg(series: list[tuple[str, list[tuple[float, float]]]], x_label: str, title: str) -> str:
    xs = [x for _, points in series for x, _ in points]
    ys = [y for _, points in series for _, y in points]
    x_max, y_min, y_max = max(xs), min(ys), max(ys)
    y_min, y_max = y_min - 0.05 * (y_max - y_min), y_max + 0.05 * (y_max - y_min)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(v: float) -> float:
        return LEFT + plot_w * v / x_max

    def sy(v: float) -> float:
        return TOP + plot_h * (y_max - v) / (y_max - y_min)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
           'font-size="12">', '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{LEFT}" y="18" font-size="14">{title}</text>']  # fmt: skip
    for v in ticks(0, x_max):
        out.append(f'<line x1="{sx(v):.1f}" y1="{TOP}" x2="{sx(v):.1f}" y2="{TOP + plot_h}" stroke="#eee"/>')
        out.append(f'<text x="{sx(v):.1f}" y="{TOP + plot_h + 15}" text-anchor="middle">{v:.0f}</text>')
    for v in ticks(y_min, y_max):
        out.append(f'<line x1="{LEFT}" y1="{sy(v):.1f}" x2="{LEFT + plot_w}" y2="{sy(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 8}" text-anchor="middle">{x_label}</text>')
    out.append(f'<text x="14" y="{TOP + plot_h / 2}" transform="rotate(-90 14 {TOP + plot_h / 2})" '
               'text-anchor="middle">held-out loss</text>')  # fmt: skip
    for i, (label, points) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in points:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>')
        ly = TOP + 10 + 18 * i
        out.append(f'<line x1="{LEFT + plot_w + 12}" y1="{ly}" x2="{LEFT + plot_w + 32}" y2="{ly}" '
                   f'stroke="{color}" stroke-width="2"/>')  # fmt: skip
        out.append(f'<text x="{LEFT + plot_w + 38}" y="{ly + 4}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--x", choices=("seconds", "step"), default="seconds")
    parser.add_argument("--cut", default="packed", help="Held-out cut: packed or grouped.")
    parser.add_argument("--title", default="Held-out masked-LM loss")
    parser.add_argument(
        "--label", action="append", default=[],
        help="A curve's name, in the records' order (repeat it); the curves after the last keep their own.",
    )  # fmt: skip
    args = parser.parse_args()
    series = curves(args.records, f"{args.cut}_loss", args.x)
    if len(args.label) > len(series):
        parser.error(f"{len(args.label)} --label for {len(series)} curves")
    series = [(args.label[i] if i < len(args.label) else name, points) for i, (name, points) in enumerate(series)]
    label = "training seconds (evaluations not counted)" if args.x == "seconds" else "optimizer steps"
    args.out.write_text(svg(series, label, args.title), encoding="utf-8")


if __name__ == "__main__":
    main()
