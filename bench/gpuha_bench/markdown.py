"""The report's pieces: a typed target verdict, the report being written, number formatting and
SVG charts (no plotting library: the bench must run on a bare machine)."""

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Target:
    """One goal of the bench and whether this run met it."""

    name: str
    ok: bool
    measured: str


@dataclass
class Report:
    """The report being written: markdown lines, the targets the sections judged, where it goes."""

    outdir: Path
    md: list = field(default_factory=list)
    targets: list = field(default_factory=list)


def fmt(v, nd=0):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def svg_bars(title, items, unit, path):
    """items: [(label, value)] -> horizontal bar chart."""
    items = [(l, v) for l, v in items if v is not None]
    if not items:
        return
    w, bar_h, left = 720, 26, 260
    h = 50 + bar_h * len(items)
    mx = max(v for _, v in items) or 1
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13">',
         f'<text x="10" y="22" font-size="15" font-weight="bold">{title}</text>']
    for i, (l, v) in enumerate(items):
        y = 36 + i * bar_h
        bw = (w - left - 110) * v / mx
        s.append(f'<text x="{left - 8}" y="{y + 17}" text-anchor="end">{l}</text>')
        s.append(f'<rect x="{left}" y="{y + 4}" width="{bw:.1f}" height="{bar_h - 8}" fill="#4a7ab5"/>')
        s.append(f'<text x="{left + bw + 6:.1f}" y="{y + 17}">{v:,.1f} {unit}</text>')
    s.append("</svg>")
    path.write_text("\n".join(s) + "\n")


def svg_lines(title, series, xlabel, ylabel, path):
    """series: [(label, [(x, y)])] -> line plot."""
    pts = [p for _, ps in series for p in ps]
    if not pts:
        return
    w, h, l, b = 720, 400, 80, 50
    mx_x = max(x for x, _ in pts) or 1
    mx_y = max(y for _, y in pts) or 1
    X = lambda x: l + (w - l - 20) * x / mx_x  # noqa: E731
    Y = lambda y: h - b - (h - b - 40) * y / mx_y  # noqa: E731
    colors = ["#4a7ab5", "#d9534f", "#5cb85c", "#f0ad4e"]
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<text x="10" y="22" font-size="15" font-weight="bold">{title}</text>',
         f'<line x1="{l}" y1="{h-b}" x2="{w-20}" y2="{h-b}" stroke="black"/>',
         f'<line x1="{l}" y1="40" x2="{l}" y2="{h-b}" stroke="black"/>',
         f'<text x="{(w+l)/2}" y="{h-12}" text-anchor="middle">{xlabel}</text>',
         f'<text x="14" y="{(h-b)/2}" transform="rotate(-90 14 {(h-b)/2})" text-anchor="middle">{ylabel}</text>']
    for k in range(5):
        xv, yv = mx_x * k / 4, mx_y * k / 4
        s.append(f'<text x="{X(xv):.0f}" y="{h-b+16}" text-anchor="middle">{xv:,.0f}</text>')
        s.append(f'<text x="{l-6}" y="{Y(yv)+4:.0f}" text-anchor="end">{yv:,.0f}</text>')
    for i, (lab, ps) in enumerate(series):
        c = colors[i % len(colors)]
        s.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{" ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in ps)}"/>')
        for x, y in ps:
            s.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{c}"/>')
        s.append(f'<text x="{l+10}" y="{56+16*i}" fill="{c}">{lab}</text>')
    s.append("</svg>")
    path.write_text("\n".join(s) + "\n")


def verdict(ok):
    return "**met**" if ok else "**missed**"


