"""The planner against published measurements of real training runs (the table in docs/published.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qlora_kit.measure.published import compare, median_abs_error, published_rows

ROOT = Path(__file__).resolve().parent.parent


def test_every_published_row_gets_a_prediction_in_its_own_unit():
    rows = compare()
    assert len(rows) == len(published_rows()) >= 17
    for r in rows:
        assert r.predicted > 0 and r.unit in ("GB", "GiB", "MB")


def test_median_error_against_published_measurements_is_under_ten_percent():
    assert median_abs_error(compare()) < 0.10


def test_the_published_table_is_regenerated_from_the_current_model():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "published_peaks.py"), "--check"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout
