"""Latent cards as plain text, rich terminal text and HTML with highlighted tokens."""

from __future__ import annotations

import html
from collections.abc import Sequence

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from saefeat.explain.cards import Context, LatentCard

_SHADES = ("on #3a2a00", "on #5c3d00", "on #8a5a00", "on #b87400", "on #e69500")


def _split(piece: str) -> tuple[str, str]:
    core = piece.lstrip()
    return piece[: len(piece) - len(core)], core


def _flat(s: str) -> str:
    return s.replace("\r", " ").replace("\n", " ⏎ ").replace("\t", " ")


def context_plain(ctx: Context) -> str:
    """The window as one line with the peak token in «guillemets»."""
    out = []
    for i, piece in enumerate(ctx.tokens):
        lead, core = _split(piece)
        out.append(lead + (f"«{core}»" if i == ctx.peak else core))
    return " ".join(_flat("".join(out)).split())


def context_rich(ctx: Context, scale: float | None = None) -> Text:
    """The window with each token shaded by activation (relative to `scale`), the peak underlined in «»."""
    scale = scale or max(max(ctx.acts, default=0.0), 1e-9)
    text = Text()
    for i, (piece, a) in enumerate(zip(ctx.tokens, ctx.acts)):
        lead, core = _split(_flat(piece))
        text.append(lead)
        style = _SHADES[min(len(_SHADES) - 1, int(len(_SHADES) * a / scale))] if a > 0 else ""
        if i == ctx.peak:  # «» keep the peak visible where colours are not shown (pipes, logs)
            style = (style + " bold underline").strip()
            core = f"«{core}»"
        text.append(core, style=style or None)
    text.append(f"   {ctx.act:.2f}", style="dim")
    return text


def card_panel(card: LatentCard, n_top: int = 8, n_weak: int = 4) -> Panel:
    """A rich panel of one latent card, for the terminal."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("label", card.label or "-")
    if card.llm_label:
        score = "" if card.llm_score is None else f"  (detection balanced accuracy {card.llm_score:.2f})"
        head.add_row("LLM label", card.llm_label + score)
    head.add_row("density", f"{card.density:.4%} of tokens ({card.n_fire} firings)")
    head.add_row("activation", f"mean {card.mean_act:.3f}, max {card.max_act:.3f}")
    if card.promotes:
        head.add_row("promotes", ", ".join(repr(t) for t in card.promotes))
        head.add_row("suppresses", ", ".join(repr(t) for t in card.suppresses))
    if card.source:
        head.add_row("contexts from", card.source)
    parts: list = [head]
    scale = card.max_act or None
    if card.top:
        parts += [Text("\ntop activations", style="bold")] + [context_rich(c, scale) for c in card.top[:n_top]]
    if card.weak:
        parts += [Text("\nweak activations (random firing sample, weakest first)", style="bold")]
        parts += [context_rich(c, scale) for c in card.weak[:n_weak]]
    if card.dead:
        parts.append(Text("\nthis latent never fired on the reference corpus", style="yellow"))
    return Panel(Group(*parts), title=f"latent {card.latent}", title_align="left")


def context_html(ctx: Context, scale: float | None = None) -> str:
    """The window as HTML: firing tokens in <mark> shaded by activation, the peak with class "peak"."""
    scale = scale or max(max(ctx.acts, default=0.0), 1e-9)
    out = []
    for i, (piece, a) in enumerate(zip(ctx.tokens, ctx.acts)):
        lead, core = _split(piece)
        out.append(html.escape(lead))
        if a > 0 or i == ctx.peak:
            alpha = min(1.0, 0.15 + 0.85 * max(a, 0.0) / scale)
            cls = ' class="peak"' if i == ctx.peak else ""
            out.append(f'<mark{cls} style="background-color: rgba(255, 150, 0, {alpha:.2f})" '
                       f'title="{a:.3f}">{html.escape(core)}</mark>')
        else:
            out.append(html.escape(core))
    return f'<span class="ctx">{"".join(out)}</span> <span class="act">{ctx.act:.2f}</span>'


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
.ctx { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.9em; }
mark { color: inherit; border-radius: 2px; }
mark.peak { outline: 2px solid #c0392b; font-weight: bold; }
.act { color: #888; font-size: 0.8em; }
.example { margin-bottom: 0.4em; }
"""


def report_html(title: str, cards: Sequence[LatentCard], importance: Sequence[float], n_examples: int = 2,
                note: str = "") -> str:
    """A self-contained HTML page: one table row per latent with label, density and highlighted examples."""
    rows = []
    for card, imp in zip(cards, importance):
        examples = "".join(f'<div class="example">{context_html(c, card.max_act or None)}</div>'
                           for c in card.top[:n_examples]) or "<em>no firing context found</em>"
        label = html.escape(card.best_label or "-")
        rows.append(f"<tr><td>{card.latent}</td><td>{imp:.4g}</td><td>{label}</td>"
                    f"<td>{card.density:.3%}</td><td>{examples}</td></tr>")
    t = html.escape(title)
    note_html = f"<p>{html.escape(note)}</p>" if note else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{t}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>{t}</h1>\n{note_html}\n"
            "<table>\n<thead><tr><th>latent</th><th>importance</th><th>label</th><th>density</th>"
            "<th>examples (highlight = activation, outlined = peak)</th></tr></thead>\n<tbody>\n"
            + "\n".join(rows) + "\n</tbody>\n</table>\n</body>\n</html>\n")
