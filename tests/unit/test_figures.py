"""The method-comparison figure is written, valid and guarded against bad rows."""

from __future__ import annotations

import struct
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from sa_lens.analysis import plot_method_comparison  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows() -> list[dict]:
    rows = []
    for scenario in ("Base", "SFT", "Edited"):
        for method, asr in (("Original", 0.8), ("Safety Arithmetic", 0.1), ("HDR only", 0.3)):
            rows.append(
                {
                    "scenario": scenario,
                    "method": method,
                    "asr": asr,
                    "over_refusal": 0.05,
                    "utility": 0.31,
                    "degenerate": 0.0,
                    "asr_advbench": 0.5,
                }
            )
    return rows


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE
    assert header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def test_figure_is_a_plausible_png(tmp_path: Path) -> None:
    out = plot_method_comparison(_rows(), tmp_path / "figs" / "comparison.png")
    assert out == tmp_path / "figs" / "comparison.png"
    width, height = _png_size(out)
    # Four panels (degenerate present) at 200 dpi: several thousand pixels wide.
    assert 2000 < width < 6000
    assert 500 < height < 2000
    assert out.stat().st_size > 20_000
    assert plt.get_fignums() == []


def test_three_panels_without_degenerate(tmp_path: Path) -> None:
    rows = [{k: v for k, v in row.items() if k != "degenerate"} for row in _rows()]
    width_three, _ = _png_size(plot_method_comparison(rows, tmp_path / "three.png"))
    width_four, _ = _png_size(plot_method_comparison(_rows(), tmp_path / "four.png"))
    assert width_three < width_four


def test_missing_pair_and_string_path_are_fine(tmp_path: Path) -> None:
    rows = _rows()[:-1]
    out = plot_method_comparison(rows, str(tmp_path / "gap.png"))
    assert out.is_file()


@pytest.mark.parametrize("key", ["scenario", "method", "asr", "over_refusal", "utility"])
def test_missing_key_is_named(tmp_path: Path, key: str) -> None:
    rows = _rows()
    del rows[4][key]
    with pytest.raises(ValueError, match=repr(key)):
        plot_method_comparison(rows, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"asr": 12.0}, "fractions"),
        ({"utility": None}, "fractions"),
        ({"method": "Original", "scenario": "Base"}, "one per pair"),
    ],
)
def test_bad_rows_are_rejected(tmp_path: Path, change: dict, message: str) -> None:
    rows = _rows()
    rows[1].update(change)
    with pytest.raises(ValueError, match=message):
        plot_method_comparison(rows, tmp_path / "bad.png")


def test_empty_rows_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no rows"):
        plot_method_comparison([], tmp_path / "bad.png")


def test_path_is_written_exactly(tmp_path: Path) -> None:
    out = plot_method_comparison(_rows(), tmp_path / "no_suffix")
    assert out == tmp_path / "no_suffix"
    assert _png_size(out)[0] > 0
    assert not (tmp_path / "no_suffix.png").exists()
