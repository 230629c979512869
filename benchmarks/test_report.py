"""The report's PNG chart renders, with every title inside the figure (skipped without matplotlib:
``pip install -e ".[test,bench]"``). Synthetic figures: no checkpoint is read, nothing is timed."""

from __future__ import annotations

import benchlib
import pytest
import report

pytest.importorskip("matplotlib", reason='matplotlib is not installed (pip install -e ".[test,bench]")')

ARCH = "ViT-B-32"
SECONDS = {"zip": 0.099, "legacy": 0.146, "pickle": 0.155, "state_dict": 0.081, "safetensors": 0.077,
           "read_zip": 0.014, "floor": 0.0095, "floor_nommap": 0.246, "read_legacy": 0.221, "read_pickle": 0.222,
           "manual": 1.35, "verify": 3.6, "hand_loop": 3.5, "verify_integrity": 3.7, "verify_no_integrity": 3.5}


@pytest.fixture
def archs() -> dict:
    saved = dict(benchlib.RESULTS)
    benchlib.RESULTS.clear()
    try:
        for label, seconds in SECONDS.items():
            benchlib.record(ARCH, label, seconds, rounds=5)
        yield {ARCH: {"figures": dict(benchlib.RESULTS[ARCH]), "ratios": benchlib.ratios(ARCH)}}
    finally:
        benchlib.RESULTS.clear()
        benchlib.RESULTS.update(saved)


def test_chart_renders_unclipped(archs, tmp_path):
    import matplotlib.pyplot as plt

    title = ("pool load time vs baselines, 2cpu-amd-epyc-7b13-64-core-processor, 2026-12-07 "
             "(torch 2.14.1, open_clip 3.3.0)")
    fig = report.draw_cpu(archs, title)
    assert fig is not None
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        box = fig.bbox
        texts = [fig._suptitle, *(ax.title for ax in fig.axes)]
        assert len([t for t in texts if t is not None and t.get_text()]) == 2
        for text in texts:  # the subtitle (the ratios line) and the title stay within the figure
            extent = text.get_window_extent(renderer)
            assert extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1, (text.get_text(), extent, box)
            assert extent.y0 >= box.y0 - 1 and extent.y1 <= box.y1 + 1, (text.get_text(), extent, box)
    finally:
        plt.close(fig)
    png = tmp_path / "chart.png"
    assert report.chart_cpu(archs, png, title)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
