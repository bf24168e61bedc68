"""A code location for the worker-kill test: the project's real assets and ``landing_sensor``,
with an ``ingest_month`` job that stops before the retrain (the project's job would go on to
train and start Ray Serve on the first month, which this test does not need)."""

import dagster as dg

from mlops_assets import definitions as project
from mlops_assets.monitor.sensors import INGEST_ASSETS, INGEST_JOB, landing_sensor
from resources import default_resources
from resources.retrain_policy import RetrainPolicyResource

ingest_only = dg.define_asset_job(
    INGEST_JOB, selection=dg.AssetSelection.assets(*INGEST_ASSETS),
    executor_def=dg.in_process_executor,
)  # fmt: skip

defs = dg.Definitions(
    assets=list(project.defs.assets or []),
    asset_checks=list(project.defs.asset_checks or []),
    jobs=[ingest_only],
    sensors=[landing_sensor.with_updated_job(ingest_only)],
    # No trials config in the landing sensor's run requests: this job has no training step.
    resources={**default_resources(), "retrain_policy": RetrainPolicyResource()},
)
