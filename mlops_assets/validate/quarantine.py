"""Split a raw table into valid rows and quarantined rows, each with the checks it failed.

Rows in = valid + quarantined, always: every input row lands in exactly one of the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandera.errors
import polars as pl

from mlops_assets.validate.schemas import TableSpec
from resources.extract import SourceError
from resources.files import MONTH_RE, parse_month

QUARANTINE_SCHEMA = {
    "table": pl.String,
    "source": pl.String,
    "partition": pl.String,
    "row_index": pl.Int64,
    "checks": pl.List(pl.String),
    "reason": pl.String,
    "record": pl.String,
}
_ROW = "__row"


@dataclass(frozen=True)
class ValidationOutcome:
    valid: pl.DataFrame
    quarantine: pl.DataFrame
    failures_by_check: dict[str, int] = field(default_factory=dict)

    @property
    def rows_in(self) -> int:
        return self.valid.height + self.quarantine.height

    @property
    def quarantine_share(self) -> float:
        return self.quarantine.height / self.rows_in if self.rows_in else 0.0


def _cast_expr(name: str, source: pl.DataType, target: pl.DataType) -> pl.Expr:
    col = pl.col(name)
    if source == pl.Binary:
        # Bytes (a SQL BLOB) are never a valid value: each one is reported as the wrong type.
        return pl.when(col.is_null()).then(None).otherwise(None).cast(target)
    if isinstance(target, pl.Datetime) and source == pl.String:
        text = col.str.strip_chars()
        # ISO 8601 in UTC, as exported ("2013-01-01T10:00:00Z") or without the zone marker.
        return pl.coalesce(
            text.str.to_datetime(fmt, strict=False, time_unit="us").dt.replace_time_zone("UTC")
            for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S")
        )
    if isinstance(target, pl.Datetime) and isinstance(source, pl.Datetime):
        if source.time_zone is None:
            return col.dt.replace_time_zone("UTC").dt.cast_time_unit("us")
        return col.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    if source == pl.String:
        col = col.str.strip_chars()
        if target.is_integer():
            # "12.0" from a float-typed export is still the integer 12; "12.5" is not.
            as_float = col.cast(pl.Float64, strict=False)
            return pl.when(as_float == as_float.round(0)).then(as_float).cast(target, strict=False)
    return col.cast(target, strict=False)


def _cast(raw: pl.DataFrame, spec: TableSpec) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Cast to the schema's dtypes; a value that does not parse becomes a failure, not a guess."""
    typed = raw.select(
        _cast_expr(name, raw.schema[name], target).alias(name)
        for name, target in spec.dtypes.items()
    )
    failures = [
        pl.DataFrame({_ROW: mask.arg_true(), "checks": f"{name}: wrong type (expected {target})"})
        for name, target in spec.dtypes.items()
        if (mask := raw.get_column(name).is_not_null() & typed.get_column(name).is_null()).any()
    ]
    bad = (
        pl.concat(failures)
        if failures
        else pl.DataFrame(schema={_ROW: pl.UInt32, "checks": pl.String})
    )
    return typed, bad


def _schema_failures(typed: pl.DataFrame, spec: TableSpec) -> pl.DataFrame:
    try:
        spec.schema.validate(typed, lazy=True)
    except pandera.errors.SchemaErrors as exc:
        cases = exc.failure_cases
    else:
        return pl.DataFrame(schema={_ROW: pl.UInt32, "checks": pl.String})
    table_level = cases.filter(pl.col("index").is_null())
    if table_level.height:
        details = "; ".join(
            f"{r['column']}: {r['check']} ({r['failure_case']})" for r in table_level.to_dicts()
        )
        raise SourceError(f"{spec.name}: the table as a whole fails its schema: {details}")
    return cases.select(
        pl.col("index").cast(pl.UInt32).alias(_ROW),
        pl.format(
            "{}: {} (value {})", "column", "check", pl.col("failure_case").fill_null("null")
        ).alias("checks"),
    )


def _outside_partition(typed: pl.DataFrame, partition: str | None) -> pl.DataFrame:
    """Rows of another month than the monthly partition they arrived in (a mislabelled export)."""
    if partition is None or not MONTH_RE.match(partition) or "month" not in typed.columns:
        return pl.DataFrame(schema={_ROW: pl.UInt32, "checks": pl.String})
    year, month = parse_month(partition)
    return (
        typed.with_row_index(_ROW)
        .filter((pl.col("year") != year) | (pl.col("month") != month))  # null: a type failure
        .select(
            _ROW,
            pl.concat_str(
                pl.lit(f"month: outside partition {partition} (value "),
                pl.col("year").cast(pl.String), pl.lit("-"), pl.col("month").cast(pl.String),
                pl.lit(")"),
            ).alias("checks"),
        )
    )  # fmt: skip


def validate_table(
    raw: pl.DataFrame, spec: TableSpec, *, source: str, partition: str | None
) -> ValidationOutcome:
    """Validate ``raw`` against ``spec``: valid typed rows, and quarantined rows with reasons."""
    missing = [c for c in spec.dtypes if c not in raw.columns]
    if missing:
        raise SourceError(f"{spec.name} from {source}: missing column(s) {missing}")
    raw = raw.select(list(spec.dtypes))
    typed, type_failures = _cast(raw, spec)
    # Nulls created by a failed cast are reported once, as the wrong type.
    schema_failures = _schema_failures(typed, spec)
    type_failed_cols = type_failures.select(
        _ROW, pl.col("checks").str.split(":").list.first().alias("column")
    )
    schema_failures = (
        schema_failures.with_columns(pl.col("checks").str.split(":").list.first().alias("column"))
        .join(type_failed_cols, on=[_ROW, "column"], how="anti")
        .drop("column")
    )
    failed = pl.concat([type_failures, schema_failures, _outside_partition(typed, partition)])
    failed_rows = failed.get_column(_ROW).unique()

    indexed = typed.with_row_index(_ROW)
    passing = indexed.filter(~pl.col(_ROW).is_in(failed_rows.implode()))
    duplicate = passing.filter(~pl.struct(list(spec.keys)).is_first_distinct())
    if duplicate.height:
        failed = pl.concat(
            [
                failed,
                duplicate.select(_ROW, pl.lit(f"duplicate key {list(spec.keys)}").alias("checks")),
            ]
        )
    reasons = failed.group_by(_ROW).agg(pl.col("checks")).sort(_ROW)

    records = (
        raw.with_row_index(_ROW)
        .filter(pl.col(_ROW).is_in(reasons.get_column(_ROW).implode()))
        # Bytes (a SQL BLOB) have no JSON form: the record keeps them as hex.
        .with_columns(pl.col(pl.Binary).bin.encode("hex"))
        .select(_ROW, pl.struct(pl.all().exclude(_ROW)).struct.json_encode().alias("record"))
    )
    quarantine = (
        reasons.join(records, on=_ROW, how="left")
        .select(
            pl.lit(spec.name).alias("table"),
            pl.lit(source).alias("source"),
            pl.lit(partition or "all").alias("partition"),
            pl.col(_ROW).cast(pl.Int64).alias("row_index"),
            pl.col("checks"),
            pl.col("checks").list.join("; ").alias("reason"),
            pl.col("record"),
        )
        .cast(QUARANTINE_SCHEMA)
    )
    valid = indexed.filter(~pl.col(_ROW).is_in(reasons.get_column(_ROW).implode())).drop(_ROW)
    by_check = (
        failed.select(pl.col("checks").str.replace(r" \(value .*\)$", ""))
        .group_by("checks")
        .len()
        .sort("len", descending=True)
    )
    return ValidationOutcome(
        valid=valid,
        quarantine=quarantine,
        failures_by_check=dict(by_check.iter_rows()),
    )
