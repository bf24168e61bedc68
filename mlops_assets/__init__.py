"""mlops-assets: a Dagster asset graph from raw flights data to a live, self-retraining model.

Ray 2.60 copies the environment of a driver started under ``uv run`` to its workers: it uploads
the driver's working directory as the job's ``working_dir`` and starts every worker (Serve's
controller and replicas included) with ``uv run`` in that copy, which builds a second
virtualenv there. The README runs everything under ``uv run``, and the project's workers need
nothing but the environment they are started from, so the copy is switched off here, before
anything imports ``ray`` (Ray reads the flag at import). Set
``RAY_ENABLE_UV_RUN_RUNTIME_ENV=1`` to have it back.
"""

import os

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
