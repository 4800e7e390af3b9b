"""The console's flight-recorder chart: well-formed SVG for 0, 1, 2 and 600 samples, a visible
lone sample, the switchover, escaping, and finite geometry for zero and absurd figures."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from qmotion.api.migration import FlightSample, MigrationPhase, MigrationReport
from qmotion.server.console.chart import NO_SAMPLES, flight_chart, sample_rows

SVG = "{http://www.w3.org/2000/svg}"
SERIES = ("remaining", "throughput", "dirty")


def _sample(t: float, *, rate: float = 100 << 20, remaining: int = 512 << 20) -> FlightSample:
    return FlightSample(
        t_s=t,
        transferred=0,
        remaining=remaining,
        dirty_bps=rate * 0.4,
        throughput_bps=rate,
        throttle_pct=0,
        passes=1 + int(t) // 10,
        rung="precopy",
        downtime_limit_ms=20,
    )


def _report(samples: list[FlightSample], **kw: object) -> MigrationReport:
    fields: dict[str, object] = {
        "outcome": MigrationPhase.DONE,
        "vm": "web",
        "source": "h1",
        "destination": "h2",
        "wall_ms": 1000.0,
        "samples": samples,
    }
    return MigrationReport.model_validate(fields | kw)


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # raises on anything ill-formed
    assert root.tag == f"{SVG}svg" and root.get("role") == "img"
    assert "nan" not in svg and "inf" not in svg
    return root


def _group(root: ET.Element, cls: str) -> ET.Element | None:
    return root.find(f".//{SVG}g[@class='{cls}']")


def _markers(root: ET.Element, series: str) -> list[ET.Element]:
    g = root.find(f".//{SVG}g[@data-series='{series}']")
    return [] if g is None else g.findall(f"{SVG}circle")


def _plot_area(root: ET.Element) -> tuple[float, float, float, float]:
    rect = root.find(f".//{SVG}rect[@class='plot-area']")
    assert rect is not None
    x, y = float(rect.get("x", "")), float(rect.get("y", ""))
    return x, x + float(rect.get("width", "")), y, y + float(rect.get("height", ""))


def _coords(root: ET.Element) -> list[float]:
    out = []
    for el in root.iter():
        for name in ("x", "y", "x1", "x2", "y1", "y2", "cx", "cy", "width", "height"):
            if el.get(name) is not None:
                out.append(float(el.get(name, "")))
        for point in el.get("points", "").split():
            out += [float(c) for c in point.split(",")]
    return out


@pytest.mark.parametrize(("n", "marked"), [(0, 0), (1, 1), (2, 2), (600, 0)])
def test_every_sample_gets_a_marker_up_to_120(n: int, marked: int) -> None:
    r = _report([_sample(float(i + 1)) for i in range(n)], total_ms=n * 1000 + 300, downtime_ms=9)
    root = _parse(flight_chart(r))
    for series in SERIES:
        assert len(_markers(root, series)) == marked, series
    assert len(root.findall(f".//{SVG}circle")) == 3 * marked
    assert len(root.findall(f".//{SVG}polyline")) == (3 if n else 0)
    assert len(sample_rows(r)) == n


def test_a_lone_sample_is_inside_the_plot_not_on_an_edge() -> None:
    """A 0.3 s migration: one sample, at 0.2 s, on an x axis padded to a second."""
    r = _report([_sample(0.2)], total_ms=300, downtime_ms=12)
    root = _parse(flight_chart(r))
    left, right, top, bottom = _plot_area(root)
    for series in SERIES:
        (circle,) = _markers(root, series)
        cx, cy = float(circle.get("cx", "")), float(circle.get("cy", ""))
        assert left < cx < right and left + 20 < cx < right - 20
        assert top <= cy <= bottom
    ticks = [t.text for t in root.iterfind(f".//{SVG}g[@class='axes']/{SVG}text")]
    assert "1.0" in ticks and "0.2" in ticks  # the x axis runs 0..1 s in round steps


def test_the_switchover_is_a_dashed_line_with_the_downtime_as_a_bar() -> None:
    r = _report(
        [_sample(float(i)) for i in range(1, 5)],
        total_ms=4500,
        downtime_ms=15,
        source_stopped_at_ms=100.0,
        guest_paused_ms=20.0,
    )
    root = _parse(flight_chart(r))
    g = _group(root, "switchover")
    assert g is not None
    line, text = g.find(f"{SVG}line"), g.find(f"{SVG}text")
    assert line is not None and line.get("stroke-dasharray") and text is not None
    assert text.text == "switchover (15 ms)"
    left, right, _, _ = _plot_area(root)
    assert left < float(line.get("x1", "")) < right
    bar = root.find(f".//{SVG}g[@class='downtime']/{SVG}rect")
    assert bar is not None and float(bar.get("width", "")) >= 2.0
    tip = root.findtext(f".//{SVG}g[@class='downtime']/{SVG}title") or ""
    assert "+20.0 ms destination resumed" in tip  # the timeline, as a tooltip
    assert _group(root, "postcopy") is None
    desc = root.findtext(f"{SVG}desc") or ""
    assert "switchover at 4.49 s with 15 ms downtime" in desc


def test_no_switchover_without_qemus_figures() -> None:
    root = _parse(flight_chart(_report([_sample(1.0), _sample(2.0)])))
    assert _group(root, "switchover") is None and _group(root, "downtime") is None


def test_no_samples_says_so_and_still_draws_the_switchover() -> None:
    r = _report([], total_ms=300, downtime_ms=12)
    root = _parse(flight_chart(r))
    assert root.findtext(f".//{SVG}text[@class='empty']") == NO_SAMPLES
    assert _group(root, "switchover") is not None
    assert NO_SAMPLES in (root.findtext(f"{SVG}desc") or "")


def test_postcopy_start_is_marked() -> None:
    r = _report([_sample(float(i)) for i in range(1, 6)], postcopy_at_s=3.0)
    g = _group(_parse(flight_chart(r)), "postcopy")
    assert g is not None and "postcopy (3.0 s)" in "".join(g.itertext())


def test_report_text_is_escaped() -> None:
    name = '<script>&"'
    r = _report([_sample(1.0)], vm=name, source="h1<b>", destination="h2&amp;")
    svg = flight_chart(r)
    assert "<script>" not in svg and "<b>" not in svg
    root = _parse(svg)
    title = root.findtext(f"{SVG}title") or ""
    assert title.startswith(f"{name}: h1<b> → h2&amp; (done)")
    ids = (root.get("aria-labelledby") or "").split()
    labels = [root.find(f"{SVG}title"), root.find(f"{SVG}desc")]
    assert [None if el is None else el.get("id") for el in labels] == ids


def test_characters_xml_forbids_do_not_break_the_document() -> None:
    _parse(flight_chart(_report([_sample(1.0)], vm="a\x00b\x1b\udcff")))


def test_zero_rates_give_flat_lines_and_finite_coordinates() -> None:
    r = _report([_sample(float(i), rate=0.0, remaining=0) for i in range(3)])
    root = _parse(flight_chart(r))
    _, _, _, bottom = _plot_area(root)
    for series in SERIES:
        assert {float(c.get("cy", "")) for c in _markers(root, series)} == {bottom}
    assert all(math.isfinite(c) for c in _coords(root))


@pytest.mark.parametrize("rate", [1e300, math.inf, math.nan, 1e-300])
def test_absurd_figures_still_draw(rate: float) -> None:
    r = _report([_sample(0.0, rate=rate, remaining=10**400), _sample(1.0, rate=rate)])
    root = _parse(flight_chart(r))
    left, right, top, bottom = _plot_area(root)
    assert all(math.isfinite(c) for c in _coords(root))
    for series in SERIES:
        for c in _markers(root, series):
            assert left < float(c.get("cx", "")) < right
            assert top <= float(c.get("cy", "")) <= bottom


def test_small_sizes_stay_valid() -> None:
    r = _report([_sample(1.0), _sample(2.0)], total_ms=2500, downtime_ms=10)
    root = _parse(flight_chart(r, width=10, height=10))
    left, right, top, bottom = _plot_area(root)
    assert left < right and top < bottom


def test_sample_rows_are_formatted_for_the_table() -> None:
    r = _report([_sample(12.34, rate=3 << 20, remaining=1536 << 20)])
    assert sample_rows(r) == [("12.3", "2", "1536.0", "3.0", "1.2")]


def test_the_cli_plot_of_a_lone_sample_is_not_empty(tmp_path: Path) -> None:
    """``task report --plot`` of a 0.3 s migration: a marker, on an x range around it."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from qmotion.cli import plot

    seen: list[tuple[float, float, str]] = []
    real_close = plt.close

    def close(fig: object) -> None:
        ax = fig.axes[0]  # type: ignore[attr-defined]
        lo, hi = ax.get_xlim()
        seen.append((lo, hi, ax.get_lines()[0].get_marker()))
        real_close(fig)  # type: ignore[arg-type]

    r = _report([_sample(0.2)], total_ms=300, downtime_ms=12)
    png = tmp_path / "m.png"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt, "close", close)
        plot.plot(r, png)
    assert png.read_bytes()[:4] == b"\x89PNG"
    ((lo, hi, marker),) = seen
    assert lo < 0.2 < hi and (lo, hi) == (0.0, 1.0) and marker == "o"
