"""The report document (blocks rendered both as Markdown and as self-contained HTML) and number formatting."""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..analysis import Estimate


def num(value: float, axis: str = "wall_train_s") -> str:
    return f"{value:.1f}" if axis == "wall_train_s" else f"{value:,.0f}"


def count(value: float) -> str:
    return f"{value:,.0f}"


def est(e: Estimate, fmt: Callable[[float], str] = lambda v: f"{v:.1f}") -> str:
    if e.mean is None:
        return f"not reached by {e.missing}/{e.n} seeds"
    if e.half_width is None:
        return f"{fmt(e.mean)} (n=1)"
    return f"{fmt(e.mean)} ± {fmt(e.half_width)}"


def pct(v: float) -> str:
    return f"{100 * v:.2f} %"


def err(e: Estimate) -> str:
    return est(e, pct)


def speed(sp: Estimate | None, time: Estimate) -> str:
    if sp is None:
        return "—"
    if time.mean is None:
        return "not reached"
    if sp.mean is None:
        return "baseline not reached"
    return est(sp, lambda v: f"{v:.2f}x")


def csv_value(value: float | None, missing: str = "") -> str | float:
    return missing if value is None else value


@dataclass
class Document:
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", (list(header), [[str(c) for c in row] for row in rows])))

    def figure(self, name: str, fig: Any, caption: str) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        self.figures[name] = buffer.getvalue()
        self.blocks.append(("img", (name, caption)))

    def markdown(self) -> str:
        out = []
        for kind, value in self.blocks:
            if kind == "h":
                out.append("#" * value[0] + " " + value[1])
            elif kind == "p":
                out.append(value)
            elif kind == "table":
                header, rows = value
                cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731
                out.append(
                    "\n".join(
                        ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
                        + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
                    )
                )
            else:
                out.append(f"![{value[1]}](figures/{value[0]})\n\n*{value[1]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        def inline(text: str) -> str:
            return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))

        body = []
        for kind, value in self.blocks:
            if kind == "h":
                body.append(f"<h{value[0]}>{inline(value[1])}</h{value[0]}>")
            elif kind == "p":
                body.append(f"<p>{inline(value)}</p>")
            elif kind == "table":
                header, rows = value
                head = "".join(f"<th>{inline(c)}</th>" for c in header)
                cells = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            else:
                data = base64.b64encode(self.figures[value[0]]).decode()
                body.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(value[1])}">'
                    f"<figcaption>{inline(value[1])}</figcaption></figure>"
                )
        style = (
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
            "table{border-collapse:collapse;margin:1em 0;font-size:.9em}"
            "th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}th{background:#f3f3f3}"
            "td:first-child,th:first-child{text-align:left}img{max-width:100%}figcaption{color:#555;font-size:.9em}"
            "code{background:#f3f3f3;padding:0 .2em}"
        )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
        )
