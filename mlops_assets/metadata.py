"""Readable metadata for the UI: row counts, schemas, previews."""

from __future__ import annotations

import base64

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


def latest_materialization(
    instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None
) -> dg.AssetMaterialization | None:
    """The newest materialization of ``key`` (one partition of it, when given)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    return records[0].asset_materialization if records else None


def latest_metadata_value(
    instance: dg.DagsterInstance, key: dg.AssetKey, name: str, partition: str | None = None
) -> object | None:
    materialization = latest_materialization(instance, key, partition)
    if materialization is None or name not in materialization.metadata:
        return None
    return materialization.metadata[name].value


def partition_versions(
    context: dg.AssetExecutionContext, months: list[str]
) -> list[dict[str, str | None]]:
    """The Dagster data version of every feature partition the model was trained on."""
    key = dg.AssetKey("flight_features")
    out = []
    for month in months:
        materialization = latest_materialization(context.instance, key, month)
        tags = materialization.tags if materialization else {}
        out.append({"partition": month, "data_version": (tags or {}).get("dagster/data_version")})
    return out


def png_markdown(png: bytes, alt: str) -> str:
    """A PNG embedded in markdown metadata (the Dagster UI renders data URIs)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
