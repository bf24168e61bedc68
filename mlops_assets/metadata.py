"""Readable metadata for the UI: row counts, schemas, previews."""

from __future__ import annotations

import dagster as dg
import polars as pl


def column_schema(frame: pl.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[dg.TableColumn(name, str(dtype)) for name, dtype in frame.schema.items()]
    )


def markdown_table(frame: pl.DataFrame, max_rows: int = 10) -> str:
    """A small markdown table (header + up to ``max_rows`` rows)."""
    shown = frame.head(max_rows)
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "---|" * len(shown.columns)
    rows = ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in shown.rows()]
    return "\n".join([header, rule, *rows])


def table_metadata(frame: pl.DataFrame, preview_rows: int = 5) -> dict[str, dg.MetadataValue]:
    return {
        "dagster/row_count": dg.MetadataValue.int(frame.height),
        "dagster/column_schema": dg.MetadataValue.table_schema(column_schema(frame)),
        "columns": dg.MetadataValue.int(frame.width),
        "preview": dg.MetadataValue.md(markdown_table(frame, preview_rows)),
    }
