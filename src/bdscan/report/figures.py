"""Inline SVG figures for the HTML reports, drawn by hand.

Hand-drawn SVG rather than matplotlib: the report must be one self-contained file, and
three chart kinds (heatmap, ranked bars, grouped before/after bars) are ~150 lines here,
against a ~40 MB dependency that bdscan does not otherwise need. The SVG stays text: it
scales to any width, prints sharp, can be searched and asserted on in tests, and every
label passes through ``html.escape`` (model vocabularies and file names are attacker-chosen).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Sequence

WIDTH = 720  # viewBox width; the figure scales to its container
ROW = 22  # bar row height
LABEL_W = 230  # left margin for bar labels
BEFORE, AFTER, NEUTRAL, BAND, LINE = "#c2410c", "#15803d", "#2563eb", "#e5e7eb", "#b42318"


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def short(text: object, n: int = 32) -> str:
    """Truncate (then escape at the use site): keeps long keys and module names legible."""
    s = str(text).replace("\n", "⏎")
    return s if len(s) <= n else s[: n - 1] + "…"


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".") if abs(x) < 1000 else f"{x:.0f}"


def _svg(figure_id: str, title: str, height: float, body: list[str], caption: str) -> str:
    return (f'<figure class="fig" data-figure="{esc(figure_id)}">'
            f'<svg viewBox="0 0 {WIDTH} {math.ceil(height)}" role="img" aria-label="{esc(title)}">'
            f'<title>{esc(title)}</title>{"".join(body)}</svg>'
            f'<figcaption>{esc(caption)}</figcaption></figure>')


def _text(x: float, y: float, text: object, *, anchor: str = "start", size: int = 12, fill: str = "#1f2328",
          full: object | None = None) -> str:
    tip = f"<title>{esc(full)}</title>" if full is not None and str(full) != str(text) else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}">'
            f'{tip}{esc(text)}</text>')


def _rect(x: float, y: float, w: float, h: float, fill: str, tip: str | None = None) -> str:
    inner = f"<title>{esc(tip)}</title>" if tip else ""
    return f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{h:.1f}" fill="{fill}">{inner}</rect>'


def _z_color(z: float | None, cap: float = 6.0) -> str:
    """Diverging: white at 0, red for a rise (backdoor-like), blue for a fall."""
    if z is None or not math.isfinite(z):
        return "#f3f4f6"
    t = max(-1.0, min(1.0, z / cap))
    r, g, b = (255, int(255 * (1 - t)), int(255 * (1 - t))) if t >= 0 else (int(255 * (1 + t)), int(255 * (1 + t)), 255)
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(values: Sequence[Sequence[float | None]], rows: Sequence[str], cols: Sequence[str], *, figure_id: str,
            title: str, caption: str) -> str:
    """Cells coloured by z (capped at ±6); the value is printed when the cells are wide enough."""
    n_rows, n_cols = len(rows), max((len(r) for r in values), default=0)
    left, top = 70, 40
    cell_w = min(80.0, (WIDTH - left - 10) / max(n_cols, 1))
    cell_h = min(32.0, max(12.0, cell_w * 0.6))
    body = [_text(left, 16, title, size=13)]
    body += [_text(left + (j + 0.5) * cell_w, top - 6, cols[j], anchor="middle", size=10) for j in range(n_cols)]
    for i, row in enumerate(values):
        y = top + i * cell_h
        body.append(_text(left - 6, y + cell_h * 0.65, rows[i], anchor="end", size=11))
        for j, z in enumerate(row):
            tip = f"{rows[i]} {cols[j]}: z {z:+.2f}" if z is not None and math.isfinite(z) else f"{rows[i]} {cols[j]}: n/a"
            body.append(_rect(left + j * cell_w, y, cell_w - 1, cell_h - 1, _z_color(z), tip))
            if cell_w >= 30 and z is not None and math.isfinite(z):
                body.append(_text(left + (j + 0.5) * cell_w, y + cell_h * 0.65, f"{z:+.1f}", anchor="middle", size=10))
    legend_y = top + n_rows * cell_h + 14
    for k, z in enumerate((-6, -3, 0, 3, 6)):
        body.append(_rect(left + k * 46, legend_y, 44, 10, _z_color(z)))
        body.append(_text(left + k * 46 + 22, legend_y + 24, f"{z:+d}", anchor="middle", size=10))
    body.append(_text(left + 5 * 46 + 8, legend_y + 10, "z vs control tokens", size=10))
    return _svg(figure_id, title, legend_y + 34, body, caption)


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]
    color: str


def _scale(lo: float, hi: float, width: float):
    span = (hi - lo) or 1.0
    return lambda v: LABEL_W + (v - lo) / span * width


def bars(labels: Sequence[str], series: Sequence[Series], *, figure_id: str, title: str, caption: str,
         lo: float = 0.0, hi: float | None = None, fmt: str = "{:.2f}", band: tuple[float, float, str] | None = None,
         line: tuple[float, str] | None = None) -> str:
    """Horizontal bars, one group per label and one bar per series (before/after, or
    patching/curvature), with an optional shaded band and a vertical reference line."""
    finite = [v for s in series for v in s.values if v is not None and math.isfinite(v)]
    marks = [x for x in ((band[0], band[1]) if band else ()) + ((line[0],) if line else ())]
    lo = min([lo] + finite + marks)
    hi = max([hi if hi is not None else 0.0] + finite + marks) or 1.0
    plot_w = WIDTH - LABEL_W - 70
    x = _scale(lo, hi, plot_w)
    group_h = ROW * len(series) + 8
    top = 30 + 18 * (len(series) > 1)
    height = top + group_h * len(labels) + 26
    body = [_text(10, 16, title, size=13)]
    if len(series) > 1:
        for k, s in enumerate(series):
            body += [_rect(LABEL_W + k * 150, 26, 12, 12, s.color), _text(LABEL_W + 16 + k * 150, 37, s.name, size=11)]
    if band:
        body.append(_rect(x(band[0]), top - 4, x(band[1]) - x(band[0]), group_h * len(labels), BAND, band[2]))
    for i, label in enumerate(labels):
        y0 = top + i * group_h
        body.append(_text(LABEL_W - 8, y0 + group_h / 2 + 2, short(label), anchor="end", full=label))
        for k, s in enumerate(series):
            v = s.values[i] if i < len(s.values) else None
            y = y0 + k * ROW
            if v is None or not math.isfinite(v):
                body.append(_text(x(0) + 4, y + ROW * 0.7, "n/a", size=11, fill="#57606a"))
                continue
            x0, x1 = sorted((x(0), x(v)))
            body.append(_rect(x0, y + 2, x1 - x0, ROW - 6, s.color, f"{label}: {s.name} {fmt.format(v)}"))
            body.append(_text(x1 + 4, y + ROW * 0.65, fmt.format(v), size=11))
    axis_y = top + group_h * len(labels)
    body.append(f'<line x1="{x(0):.1f}" y1="{top - 4}" x2="{x(0):.1f}" y2="{axis_y:.1f}" stroke="#57606a"/>')
    if line:
        body.append(f'<line x1="{x(line[0]):.1f}" y1="{top - 8}" x2="{x(line[0]):.1f}" y2="{axis_y:.1f}" '
                    f'stroke="{LINE}" stroke-dasharray="4 3"/>')
        body.append(_text(x(line[0]) - 4, top - 10, line[1], anchor="end", size=10, fill=LINE))
    body += [_text(x(lo), axis_y + 16, _num(lo), anchor="start", size=10),
             _text(x(hi), axis_y + 16, _num(hi), anchor="end", size=10)]
    return _svg(figure_id, title, height, body, caption)
