"""bench/RESULTS.md sections: each benchmark replaces only its own, with date, machine and command."""

from __future__ import annotations

from pathlib import Path

from bench.results import markdown_table, write_section
from bench.summary import percentile


def test_write_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    write_section("alpha", "Alpha", "first alpha", "python -m bench.alpha", path=path)
    write_section("beta", "Beta", "only beta", "python -m bench.beta --x 1", path=path)
    write_section("alpha", "Alpha", "second alpha", "python -m bench.alpha --y", path=path)
    text = path.read_text()
    assert "first alpha" not in text and "second alpha" in text and "only beta" in text
    assert text.count("<!-- bench:alpha -->") == 1 and text.count("<!-- /bench:beta -->") == 1
    assert text.index("## Alpha") < text.index("## Beta")  # a replaced section keeps its place
    assert "- command: `python -m bench.alpha --y`" in text
    assert "cores" in text and "GiB RAM" in text and "- date: " in text


def test_markdown_table_right_aligns_numeric_columns() -> None:
    table = markdown_table(["workers", "policy"], [[1, "rr"], [2, "lc"]])
    assert table.splitlines()[1] == "| ---: | --- |"
    assert table.splitlines()[3] == "| 2 | lc |"


def test_percentile_interpolates_between_samples() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 90) == 9.0
