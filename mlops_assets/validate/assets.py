"""Validated tables: typed rows that pass their pandera schema; the rest go to quarantine."""

from collections.abc import Iterator

import dagster as dg
import polars as pl

from mlops_assets.metadata import latest_metadata_value, markdown_table, table_metadata
from mlops_assets.partitions import MONTHLY
from mlops_assets.validate.quarantine import validate_table
from mlops_assets.validate.schemas import TABLES, TableSpec
from resources.warehouse import WarehouseResource

QUARANTINE_TABLE = "quarantine"
CHECK_NAME = "quarantine_share_below_threshold"


class ValidationConfig(dg.Config):
    max_quarantine_share: float = 0.01
    """The partition fails when more than this share of its rows is quarantined."""


def _upstream_source(context: dg.AssetExecutionContext, key: dg.AssetKey) -> str:
    """Where the raw rows came from, as recorded by the raw asset's materialization."""
    partition = context.partition_key if context.has_partition_key else None
    source = latest_metadata_value(context.instance, key, "source", partition)
    return str(source) if source is not None else key.to_user_string()


def _validated_asset(spec: TableSpec, partitioned: bool) -> dg.AssetsDefinition:
    raw_key = dg.AssetKey(f"raw_{spec.name}")

    @dg.asset(
        name=spec.name,
        group_name="validate",
        partitions_def=MONTHLY if partitioned else None,
        ins={"raw": dg.AssetIn(key=raw_key)},
        kinds={"pandera", "polars"},
        description=f"Validated {spec.name}: rows that pass the pandera schema, typed.",
        check_specs=[
            dg.AssetCheckSpec(
                CHECK_NAME,
                asset=spec.name,
                blocking=True,
                description="Fails the partition when its quarantined share passes the threshold",
            )
        ],
    )
    def _asset(
        context: dg.AssetExecutionContext,
        config: ValidationConfig,
        warehouse: WarehouseResource,
        raw: pl.DataFrame,
    ) -> Iterator[dg.Output | dg.AssetCheckResult]:
        partition = context.partition_key if partitioned else None
        source = _upstream_source(context, raw_key)
        outcome = validate_table(raw, spec, source=source, partition=partition)
        quarantine_part = f"{spec.name}__{partition or 'all'}"
        warehouse.write(QUARANTINE_TABLE, outcome.quarantine, quarantine_part)
        share = outcome.quarantine_share
        failures = pl.DataFrame(
            {
                "check": list(outcome.failures_by_check),
                "rows": list(outcome.failures_by_check.values()),
            },
            schema={"check": pl.String, "rows": pl.Int64},
        )
        yield dg.Output(
            outcome.valid,
            metadata={
                **table_metadata(outcome.valid),
                "rows_in": dg.MetadataValue.int(outcome.rows_in),
                "rows_valid": dg.MetadataValue.int(outcome.valid.height),
                "rows_quarantined": dg.MetadataValue.int(outcome.quarantine.height),
                "quarantine_share": dg.MetadataValue.float(share),
                "quarantine_path": dg.MetadataValue.path(
                    str(warehouse.path(QUARANTINE_TABLE, quarantine_part))
                ),
                "failed_checks": dg.MetadataValue.md(
                    markdown_table(failures, 20) if failures.height else "no failed checks"
                ),
                "source": dg.MetadataValue.text(source),
            },
        )
        threshold = config.max_quarantine_share
        yield dg.AssetCheckResult(
            check_name=CHECK_NAME,
            passed=share <= threshold,
            severity=dg.AssetCheckSeverity.ERROR,
            description=(
                f"{outcome.quarantine.height} of {outcome.rows_in} rows quarantined "
                f"({share:.2%}); threshold {threshold:.2%}"
            ),
            metadata={
                "quarantine_share": dg.MetadataValue.float(share),
                "threshold": dg.MetadataValue.float(threshold),
                "rows_quarantined": dg.MetadataValue.int(outcome.quarantine.height),
                "rows_in": dg.MetadataValue.int(outcome.rows_in),
            },
        )

    return _asset


flights = _validated_asset(TABLES["flights"], partitioned=True)
weather = _validated_asset(TABLES["weather"], partitioned=True)
planes = _validated_asset(TABLES["planes"], partitioned=False)
airports = _validated_asset(TABLES["airports"], partitioned=False)
airlines = _validated_asset(TABLES["airlines"], partitioned=False)
assets = [flights, weather, planes, airports, airlines]
