"""A code location for the worker-kill test: the project's real assets, ``ingest_month`` job and
``landing_sensor``, without the retrain loop (whose first run would start Ray Serve)."""

import dagster as dg

from mlops_assets import definitions as project
from mlops_assets.monitor.sensors import ingest_month_job, landing_sensor
from resources import default_resources

defs = dg.Definitions(
    assets=list(project.defs.assets or []),
    asset_checks=list(project.defs.asset_checks or []),
    jobs=[ingest_month_job],
    sensors=[landing_sensor],
    resources=default_resources(),
)
