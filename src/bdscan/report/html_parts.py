"""Building blocks of the HTML reports: page shell (CSS, no script), tables, notes.

Every piece of text that reaches the page goes through ``esc`` here or in ``figures``:
keys, targets, file names, responses and error messages come from the model or the files
under audit and are attacker-controlled.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from bdscan.report.figures import esc

CSS = """
:root{--fg:#1f2328;--muted:#57606a;--line:#d0d7de;--bad:#b42318;--good:#15803d;--warn:#9a6700;--bg:#f6f8fa}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:1180px;margin:0 auto;padding:20px}
h1{font-size:24px;margin:0 0 8px}h2{font-size:19px;margin:0 0 10px}h3{font-size:16px;margin:14px 0 6px}
section,header.top{background:#fff;border:1px solid var(--line);border-radius:8px;padding:16px 20px;margin:14px 0}
.verdict{display:inline-block;padding:4px 12px;border-radius:6px;font-weight:700;letter-spacing:.04em;color:#fff}
.v-clean{background:var(--good)}.v-repaired{background:#0f766e}.v-suspicious,.v-error{background:var(--bad)}
.v-incomplete{background:var(--warn)}
.lead{font-size:16px;margin:8px 0 0}
dl.facts{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:2px 16px;margin:12px 0 0}
dl.facts dt{color:var(--muted)}dl.facts dd{margin:0;overflow-wrap:anywhere}
code,pre,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}
pre{background:var(--bg);border:1px solid var(--line);border-radius:6px;padding:8px 10px;white-space:pre-wrap;
overflow-wrap:anywhere;margin:4px 0 10px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;margin:6px 0}
th,td{border-bottom:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
th{background:var(--bg);font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.sha{overflow-wrap:anywhere;max-width:22em}
.st-ok{color:var(--good);font-weight:600}.st-failed{color:var(--bad);font-weight:600}.st-skipped{color:var(--muted)}
.a-loaded{color:var(--good)}.a-refused{color:var(--bad);font-weight:600}.a-ignored{color:var(--muted)}
.note{color:var(--muted)}.fail{color:var(--bad)}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:12px}
figure.fig{margin:8px 0 14px;overflow-x:auto}figure.fig svg{width:100%;height:auto;max-width:900px;display:block}
figcaption{color:var(--muted);font-size:13px}
.keybox{border-left:4px solid var(--bad);background:#fff5f5;padding:8px 12px;margin:8px 0;overflow-wrap:anywhere}
footer{color:var(--muted);font-size:13px;text-align:center;padding:10px}
@media (max-width:700px){main{padding:8px}section,header.top{padding:12px;border-radius:0;margin:8px 0}
h1{font-size:20px}dl.facts{grid-template-columns:1fr}dl.facts dt{margin-top:6px}
th,td{padding:3px 5px;font-size:13px}td code,td .mono{overflow-wrap:anywhere}figure.fig svg{min-width:560px}
.wide-only{display:none}}
@media print{body{background:#fff;font-size:11pt}main{max-width:none;padding:0}
section,header.top{border:none;border-top:1px solid var(--line);border-radius:0;padding:8px 0}
h2,h3{break-after:avoid}figure.fig,tr{break-inside:avoid}.verdict{print-color-adjust:exact;-webkit-print-color-adjust:exact}
pre{white-space:pre-wrap}.scroll{overflow:visible}}
"""


def page(title: str, body: Iterable[str]) -> str:
    """A complete, self-contained document: inline CSS, inline SVG, no script, no URL."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            + "".join(body) + "</main></body></html>\n")


def section(section_id: str, title: str, parts: Iterable[str]) -> str:
    return f'<section id="{esc(section_id)}"><h2>{esc(title)}</h2>{"".join(parts)}</section>'


def facts(pairs: Sequence[tuple[str, object]]) -> str:
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{v if isinstance(v, Raw) else esc(v)}</dd>" for k, v in pairs)
    return f'<dl class="facts">{rows}</dl>'


class Raw(str):
    """Already-escaped markup (built from ``esc``-ed pieces), inserted as is."""


def code(text: object) -> Raw:
    return Raw(f"<code>{esc(text)}</code>")


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, numeric: Sequence[int] = (),
          classes: dict[int, str] | None = None) -> str:
    """Cells are escaped unless they are ``Raw``; ``classes`` maps a column to a CSS class."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    out = []
    for row in rows:
        cells = []
        for j, cell in enumerate(row):
            css = " ".join(c for c in ("num" if j in numeric else "", (classes or {}).get(j, "")) if c)
            attr = f' class="{esc(css)}"' if css else ""
            cells.append(f"<td{attr}>{cell if isinstance(cell, Raw) else esc(cell)}</td>")
        out.append(f"<tr>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(out)}</tbody></table></div>'


def note(text: str, css: str = "note") -> str:
    return f'<p class="{esc(css)}">{esc(text)}</p>'


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)
