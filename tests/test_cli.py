"""The `mlops` entry point, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl

from resources.package_data import read_package_table

MLOPS = str(Path(sys.executable).parent / "mlops")


def run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLOPS_HOME": str(home)}
    return subprocess.run([MLOPS, *args], env=env, capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = run("--help", home=tmp_path)
    assert result.returncode == 0
    assert "land" in result.stdout and "up" in result.stdout


def test_land_copies_exactly_one_month_of_real_flights(tmp_path: Path) -> None:
    result = run("land", "2013-03", home=tmp_path)
    assert result.returncode == 0, result.stderr
    landed = tmp_path / "landing" / "flights_2013-03.csv"
    frame = pl.read_csv(landed, infer_schema_length=10_000, null_values=["NA"])
    expected = read_package_table("flights").filter(pl.col("month") == 3)
    assert frame.height == expected.height > 25_000
    assert frame.columns == expected.columns
    assert frame.get_column("month").unique().to_list() == [3]


def test_land_refuses_a_month_twice_and_bad_months(tmp_path: Path) -> None:
    assert run("land", "2013-04", home=tmp_path).returncode == 0
    again = run("land", "2013-04", home=tmp_path)
    assert again.returncode == 2
    assert "already landed" in again.stderr
    for bad, message in [("2013-13", "YYYY-MM"), ("march", "YYYY-MM"), ("2014-01", "no flights")]:
        result = run("land", bad, home=tmp_path)
        assert result.returncode == 2, bad
        assert message in result.stderr, (bad, result.stderr)
    assert sorted(p.name for p in (tmp_path / "landing").iterdir()) == ["flights_2013-04.csv"]
