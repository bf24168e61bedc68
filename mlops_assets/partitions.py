"""Partitions shared across stages: one per month of flights."""

from __future__ import annotations

import dagster as dg

MONTHLY = dg.MonthlyPartitionsDefinition(start_date="2013-01", end_date="2014-01", fmt="%Y-%m")
