"""The file source: a landing directory where each month of flights arrives as one file."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import dagster as dg
import polars as pl

from resources.extract import Extract, SourceError, require_columns, sha256_bytes
from resources.package_data import read_package_flights_text
from resources.storage import write_bytes_atomic

MONTH_RE = re.compile(r"^(?P<year>\d{4})-(?P<month>0[1-9]|1[0-2])$")
FLIGHT_COLUMNS = [
    "year", "month", "day", "dep_time", "sched_dep_time", "dep_delay", "arr_time",
    "sched_arr_time", "arr_delay", "carrier", "flight", "tailnum", "origin", "dest",
    "air_time", "distance", "hour", "minute", "time_hour",
]  # fmt: skip
LANDING_SUFFIXES = (".csv", ".csv.zip")


def parse_month(month: str) -> tuple[int, int]:
    """``"2013-07"`` -> ``(2013, 7)``; anything else is a clear error."""
    match = MONTH_RE.match(month)
    if not match:
        raise ValueError(f"month must look like YYYY-MM (e.g. 2013-07), got {month!r}")
    return int(match["year"]), int(match["month"])


def decode_csv_bytes(raw: bytes, name: str) -> pl.DataFrame:
    """Parse an exported CSV strictly as UTF-8 text, every column kept as text."""
    if not raw.strip():
        raise SourceError(f"{name}: the file is empty")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"{name}: not valid UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 4]!r})"
        ) from exc
    try:
        frame = pl.read_csv(io.BytesIO(raw), infer_schema=False, null_values=["NA", ""])
    except pl.exceptions.PolarsError as exc:
        raise SourceError(f"{name}: unreadable CSV: {exc}") from exc
    if frame.is_empty():
        raise SourceError(f"{name}: a header but no rows (an empty export)")
    return frame


def read_landed_bytes(path: Path) -> bytes:
    """The CSV bytes of a landed file, unzipping ``.csv.zip`` exports."""
    data = path.read_bytes()
    if not path.name.endswith(".zip"):
        return data
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [m for m in archive.namelist() if not m.endswith("/")]
            if len(members) != 1:
                raise SourceError(f"{path}: expected one CSV in the zip, found {members}")
            return archive.read(members[0])
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as exc:
        raise SourceError(f"{path}: corrupt or truncated zip archive ({exc})") from exc


class LandingFilesResource(dg.ConfigurableResource):
    """Monthly flight exports in ``landing_dir``: ``flights_YYYY-MM.csv`` (or ``.csv.zip``)."""

    landing_dir: str

    @property
    def root(self) -> Path:
        return Path(self.landing_dir)

    def path_for(self, month: str) -> Path | None:
        parse_month(month)
        found = [
            self.root / f"flights_{month}{s}"
            for s in LANDING_SUFFIXES
            if (self.root / f"flights_{month}{s}").exists()
        ]
        if len(found) > 1:
            raise SourceError(f"month {month} landed twice: {[p.name for p in found]}")
        return found[0] if found else None

    def landed_months(self) -> list[str]:
        if not self.root.exists():
            return []
        months = {
            p.name.removeprefix("flights_").split(".")[0]
            for p in self.root.iterdir()
            if p.name.startswith("flights_") and p.name.endswith(LANDING_SUFFIXES)
        }
        return sorted(m for m in months if MONTH_RE.match(m))

    def read_month(self, month: str) -> Extract:
        path = self.path_for(month)
        if path is None:
            raise SourceError(
                f"no file has landed for month {month} in {self.root} "
                f"(expected flights_{month}.csv); land it with `mlops land {month}`"
            )
        raw = read_landed_bytes(path)
        frame = decode_csv_bytes(raw, str(path))
        require_columns(frame, FLIGHT_COLUMNS, str(path))
        return Extract(
            frame=frame.select(FLIGHT_COLUMNS), source=str(path), checksum=sha256_bytes(raw)
        )


def land_month(month: str, landing_dir: Path, *, overwrite: bool = False) -> Path:
    """Copy one month of the real flights into the landing directory, as an export would arrive."""
    year, month_number = parse_month(month)
    target = landing_dir / f"flights_{month}.csv"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{month} has already landed at {target}")
    flights = read_package_flights_text().filter(
        (pl.col("year") == str(year)) & (pl.col("month") == str(month_number))
    )
    if flights.is_empty():
        raise ValueError(f"the package has no flights for {month} (it covers 2013-01..2013-12)")
    return write_bytes_atomic(flights.write_csv().encode("utf-8"), target)
