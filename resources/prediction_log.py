"""Where serving replicas write their prediction log (JSON-lines segments), for the monitor."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import polars as pl


class PredictionLogResource(dg.ConfigurableResource):
    """The folder of prediction-log segments that every serving replica appends to."""

    folder: str

    def read_day(self, day: dt.date) -> pl.DataFrame:
        """Every complete log line whose time falls on ``day`` (UTC)."""
        from mlops_assets.serve.predlog import read_prediction_log

        lines = read_prediction_log(self.folder)
        return lines.filter(pl.col("time").dt.date() == day)
