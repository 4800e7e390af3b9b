"""The flight-recorder chart of a live migration as a self-contained SVG string (pure)."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from xml.sax.saxutils import escape

from qmotion.api.migration import MigrationReport, switchover_at_s, timeline

# Up to this many samples each one gets a marker: a short migration's one or two samples
# are otherwise a zero-length line nobody sees; past it the markers would hide the lines.
MARKED_SAMPLES = 120

# Okabe-Ito colours: told apart with the common colour-vision deficiencies, and the dirty
# rate is also dashed so the chart survives greyscale printing.
REMAINING = "#0072B2"
THROUGHPUT = "#009E73"
DIRTY = "#D55E00"
SWITCHOVER = "#222222"
POSTCOPY = "#CC79A7"
INK = "#333333"
GRID = "#E3E3E3"

# Margins around the plot area, px: tick labels of up to "999,999" MiB fit at the sides.
LEFT, RIGHT, TOP, BOTTOM = 64, 64, 30, 38
# Data stay this far inside the frame, so a sample at t=0 or at the end is not on the axis.
GUTTER = 6
NO_SAMPLES = "no samples recorded (the migration ended before the first one)"

# Beyond these a value is shown as 0 or capped: tick arithmetic must stay finite and a
# report with inf/nan (pydantic floats allow them) or absurd sizes must still draw.
TINY, HUGE = 1e-9, 1e300
# Characters XML 1.0 forbids even escaped: a name with one would make the page ill-formed.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def flight_chart(r: MigrationReport, width: int = 720, height: int = 300) -> str:
    """The migration's samples against seconds since migrate: remaining MiB (left axis),
    throughput and dirty rate MiB/s (right axis), the switchover as a dashed line with the
    downtime as a bar, postcopy's start as a dashed line. Only SVG attributes, no script or
    style sheet: the console's CSP allows it inline."""
    w, h = max(width, LEFT + RIGHT + 2 * GUTTER + 1), max(height, TOP + BOTTOM + 1)
    x0, x1, y0, y1 = LEFT, w - RIGHT, TOP, h - BOTTOM  # y0 top, y1 bottom
    ts = [_clean(s.t_s) for s in r.samples]
    remaining = [_clean(_mib(s.remaining)) for s in r.samples]
    throughput = [_clean(_mib(s.throughput_bps)) for s in r.samples]
    dirty = [_clean(_mib(s.dirty_bps)) for s in r.samples]
    at = switchover_at_s(r)
    at = None if at is None else _clean(at)
    down_s = _clean((r.downtime_ms or 0) / 1000)
    postcopy = None if r.postcopy_at_s is None else _clean(r.postcopy_at_s)

    marks = [
        *ts,
        *([] if at is None else [at, at + down_s]),
        *([] if postcopy is None else [postcopy]),
    ]
    latest = max(marks, default=0.0)
    # One sample (or none) alone would sit on an edge of a zero-wide range: give it room.
    x_ticks = _ticks(max(2 * latest, 1.0) if len(ts) <= 1 else latest)
    left_ticks = _ticks(max(remaining, default=0.0))
    # As many intervals on the right as on the left: one grid serves both axes.
    right_ticks = _ticks(max([*throughput, *dirty], default=0.0), len(left_ticks) - 1)

    def scale(lo: float, hi: float, ticks: list[float]) -> Callable[[float], float]:
        top = ticks[-1]
        return lambda v: lo + (hi - lo) * min(max(v / top, 0.0), 1.0)

    fx = scale(x0 + GUTTER, x1 - GUTTER, x_ticks)
    fl = scale(y1, y0, left_ticks)
    fr = scale(y1, y0, right_ticks)

    # Ids unique per report, so two charts on one page do not label each other; repr, not
    # JSON, since a name may hold a lone surrogate that UTF-8 cannot encode.
    uid = "fc" + hashlib.sha256(repr(r).encode("utf-8", "replace")).hexdigest()[:10]
    title = f"{r.vm}: {r.source} → {r.destination} ({r.outcome}), flight recorder"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" '
        f'height="{h}" role="img" aria-labelledby="{uid}-t {uid}-d" '
        f'font-family="sans-serif" font-size="11" fill="{INK}">',
        f'<title id="{uid}-t">{_text(title)}</title>',
        f'<desc id="{uid}-d">{_text(_describe(r, at))}</desc>',
        f'<rect width="{w}" height="{h}" fill="#FFFFFF"/>',
    ]
    out += _grid(x_ticks, left_ticks, right_ticks, fx, fl, fr, (x0, x1, y0, y1))
    out.append(
        f'<rect class="plot-area" x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" '
        f'fill="none" stroke="#999999"/>'
    )
    if at is not None:
        out += _switchover(r, at, down_s, fx, y0, y1)
    if postcopy is not None:
        xp = _n(fx(postcopy))
        out.append(
            f'<g class="postcopy"><line x1="{xp}" y1="{y0}" x2="{xp}" y2="{y1}" '
            f'stroke="{POSTCOPY}" stroke-width="1.5" stroke-dasharray="5 3"/>'
            f'<text x="{xp}" y="{y1 - 4}" dy="-4" text-anchor="start" '
            f'transform="rotate(-90 {xp} {y1 - 4})">postcopy ({_n(postcopy)} s)</text></g>'
        )
    if not ts:
        # A white halo keeps the message readable across the switchover line and bar.
        out.append(
            f'<text class="empty" x="{_n((x0 + x1) / 2)}" y="{_n((y0 + y1) / 2)}" '
            f'text-anchor="middle" stroke="#FFFFFF" stroke-width="4" paint-order="stroke">'
            f"{_text(NO_SAMPLES)}</text>"
        )
    marked = len(ts) <= MARKED_SAMPLES
    for name, colour, dash, values, fy, unit in (
        ("remaining", REMAINING, "", remaining, fl, "MiB remaining"),
        ("throughput", THROUGHPUT, "", throughput, fr, "MiB/s throughput"),
        ("dirty", DIRTY, "6 3", dirty, fr, "MiB/s dirtied"),
    ):
        if ts:
            out.append(_series(name, colour, dash, ts, values, fx, fy, unit, marked))
    out += _legend(x0, w)
    out.append("</svg>")
    return "\n".join(out)


def sample_rows(r: MigrationReport) -> list[tuple[str, str, str, str, str]]:
    """The chart's data as table rows, one per sample: (seconds since migrate, pre-copy pass,
    remaining MiB, throughput MiB/s, dirty rate MiB/s), formatted for display."""
    return [
        (
            f"{s.t_s:.1f}",
            str(s.passes),
            f"{_mib(s.remaining):.1f}",
            f"{_mib(s.throughput_bps):.1f}",
            f"{_mib(s.dirty_bps):.1f}",
        )
        for s in r.samples
    ]


def _describe(r: MigrationReport, at: float | None) -> str:
    n = len(r.samples)
    parts = [
        "Remaining memory (MiB, left axis), throughput and dirty rate (MiB/s, right axis) "
        "against seconds since migrate: "
        + (f"{n} sample{'' if n == 1 else 's'}" if n else NO_SAMPLES)
    ]
    if at is not None:
        parts.append(f"switchover at {at:.2f} s with {r.downtime_ms} ms downtime")
    if r.postcopy_at_s is not None:
        parts.append(f"postcopy from {r.postcopy_at_s:.2f} s")
    return "; ".join(parts) + "."


def _grid(
    x_ticks: list[float],
    left_ticks: list[float],
    right_ticks: list[float],
    fx: Callable[[float], float],
    fl: Callable[[float], float],
    fr: Callable[[float], float],
    box: tuple[int, int, int, int],
) -> list[str]:
    """Grid lines, tick labels and axis titles."""
    x0, x1, y0, y1 = box
    out = ['<g class="axes">']
    for lv, rv in zip(left_ticks, right_ticks, strict=True):
        y = _n(fl(lv))
        out.append(f'<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="{GRID}"/>')
        out.append(
            f'<text x="{x0 - 5}" y="{y}" dy="0.35em" text-anchor="end">'
            f"{_label(lv, left_ticks)}</text>"
        )
        out.append(
            f'<text x="{x1 + 5}" y="{_n(fr(rv))}" dy="0.35em">{_label(rv, right_ticks)}</text>'
        )
    for v in x_ticks:
        x = _n(fx(v))
        out.append(f'<line x1="{x}" y1="{y1}" x2="{x}" y2="{y1 + 4}" stroke="#999999"/>')
        out.append(f'<text x="{x}" y="{y1 + 15}" text-anchor="middle">{_label(v, x_ticks)}</text>')
    mid = _n((y0 + y1) / 2)
    out += [
        f'<text x="{_n((x0 + x1) / 2)}" y="{y1 + 31}" text-anchor="middle">'
        "seconds since migrate</text>",
        f'<text x="14" y="{mid}" text-anchor="middle" transform="rotate(-90 14 {mid})" '
        f'fill="{REMAINING}">remaining MiB</text>',
        f'<text x="{x1 + RIGHT - 10}" y="{mid}" text-anchor="middle" '
        f'transform="rotate(90 {x1 + RIGHT - 10} {mid})">MiB/s</text>',
        "</g>",
    ]
    return out


def _switchover(
    r: MigrationReport, at: float, down_s: float, fx: Callable[[float], float], y0: int, y1: int
) -> list[str]:
    """The downtime bar (at least 2 px: 12 ms of a minute is less than one) and the line."""
    xa = fx(at)
    bar = max(fx(at + down_s) - xa, 2.0)
    steps = "; ".join(f"+{ms:.1f} ms {event}" for event, ms in timeline(r))
    label = f"switchover ({r.downtime_ms} ms)"
    return [
        f'<g class="downtime"><rect x="{_n(xa)}" y="{y0}" width="{_n(bar)}" '
        f'height="{y1 - y0}" fill="{SWITCHOVER}" fill-opacity="0.18"/>'
        f"<title>{_text(f'downtime {r.downtime_ms} ms' + (f': {steps}' if steps else ''))}"
        "</title></g>",
        f'<g class="switchover"><line x1="{_n(xa)}" y1="{y0}" x2="{_n(xa)}" y2="{y1}" '
        f'stroke="{SWITCHOVER}" stroke-width="1" stroke-dasharray="4 3"/>'
        f'<text x="{_n(xa)}" y="{y0 + 4}" dy="-4" text-anchor="end" '
        f'transform="rotate(-90 {_n(xa)} {y0 + 4})">{_text(label)}</text></g>',
    ]


def _series(
    name: str,
    colour: str,
    dash: str,
    ts: Sequence[float],
    values: Sequence[float],
    fx: Callable[[float], float],
    fy: Callable[[float], float],
    unit: str,
    marked: bool,
) -> str:
    points = " ".join(f"{_n(fx(t))},{_n(fy(v))}" for t, v in zip(ts, values, strict=True))
    dashed = f' stroke-dasharray="{dash}"' if dash else ""
    out = [
        f'<g class="series" data-series="{name}">',
        f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5" '
        f'stroke-linejoin="round"{dashed}/>',
    ]
    if marked:
        out += [
            f'<circle cx="{_n(fx(t))}" cy="{_n(fy(v))}" r="3" fill="{colour}">'
            f"<title>{t:.1f} s: {v:.1f} {unit}</title></circle>"
            for t, v in zip(ts, values, strict=True)
        ]
    out.append("</g>")
    return "".join(out)


def _legend(x0: int, w: int) -> list[str]:
    out = ['<g class="legend">']
    x = float(x0)
    for colour, dash, label in (
        (REMAINING, "", "remaining MiB (left)"),
        (THROUGHPUT, "", "throughput MiB/s (right)"),
        (DIRTY, "6 3", "dirty rate MiB/s (right)"),
    ):
        if x > w - 40:  # a narrow chart drops what does not fit rather than overflow
            break
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<line x1="{_n(x)}" y1="14" x2="{_n(x + 18)}" y2="14" stroke="{colour}" '
            f'stroke-width="2"{dashed}/><text x="{_n(x + 22)}" y="14" dy="0.35em">{label}</text>'
        )
        x += 22 + 6.2 * len(label) + 16  # an average sans-serif glyph at 11 px, and a gap
    out.append("</g>")
    return out


def _ticks(peak: float, intervals: int | None = None) -> list[float]:
    """Round tick values from 0 to at least ``peak``: the tightest top that 4 to 7 round steps
    reach (nearest 5 steps on a tie), or ``intervals`` steps. A zero peak gets [0, 1], so a
    flat line lies on the axis."""
    span = peak if peak > 0 else 1.0
    if intervals is not None:
        step = _round_up(span / intervals)
        return [i * step for i in range(intervals + 1)]
    # 601 s in 5 steps of 200 would end at 800, a quarter of the width empty; 7 of 100: 700.
    options = []
    for k in (4, 5, 6, 7):
        step = _round_up(span / k)
        n = max(1, math.ceil(span / step - 1e-9))
        options.append((n * step, abs(n - 5), n, step))
    _, _, n, step = min(options)
    return [i * step for i in range(n + 1)]


def _round_up(x: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that is at least ``x`` (> 0)."""
    base = 10.0 ** math.floor(math.log10(x))
    return next((m * base for m in (1.0, 2.0, 2.5, 5.0) if x <= m * base * (1 + 1e-9)), 10 * base)


def _label(v: float, ticks: list[float]) -> str:
    """A tick's text with as many decimals as its step needs (the step is 1, 2, 2.5 or 5
    times a power of ten): 0.25, 2.5, 40, 1,500."""
    step, top = ticks[1] - ticks[0], ticks[-1]
    if top >= 1e9 or step < 1e-3:
        return f"{v:.3g}"
    exp = math.floor(math.log10(step))
    quarter = round(step / 10.0**exp, 6) == 2.5
    return f"{v:,.{max(0, -exp + quarter)}f}"


def _mib(n: float) -> float:
    try:
        return n / 2**20
    except OverflowError:  # an int too large for a float
        return math.inf


def _clean(v: float) -> float:
    """A value the geometry can use: finite, within [0, HUGE], and 0 below TINY."""
    if not math.isfinite(v):
        return HUGE if v > 0 else 0.0
    return 0.0 if v < TINY else min(v, HUGE)


def _n(v: float) -> str:
    """A coordinate: a tenth of a pixel is finer than any screen draws."""
    return f"{v:.1f}"


def _text(s: str) -> str:
    return escape(_NOT_XML.sub("\ufffd", s))
