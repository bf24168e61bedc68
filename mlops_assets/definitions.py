"""The Dagster code location: every stage's assets, checks and jobs, and the resources."""

from __future__ import annotations

import dagster as dg

from mlops_assets.evaluate import assets as evaluate
from mlops_assets.explore import assets as explore
from mlops_assets.features import assets as features
from mlops_assets.ingest import assets as ingest
from mlops_assets.monitor import assets as monitor
from mlops_assets.monitor import sensors as loop
from mlops_assets.serve import assets as serve
from mlops_assets.serve import batch as serve_batch
from mlops_assets.train import assets as train
from mlops_assets.validate import assets as validate
from resources import default_resources

defs = dg.Definitions(
    assets=[
        *ingest.assets,
        *validate.assets,
        *explore.assets,
        *features.assets,
        *train.assets,
        *evaluate.assets,
        *serve.assets,
        *serve_batch.assets,
        *monitor.assets,
    ],
    asset_checks=serve.asset_checks,
    jobs=[*evaluate.jobs, *loop.jobs],
    sensors=loop.sensors,
    schedules=loop.schedules,
    resources=default_resources(),
)
