# syntax=docker/dockerfile:1
# One image, several commands (compose.yaml picks one per service): the Dagster webserver,
# daemon and code server (gRPC), run workers launched by the daemon, and the Ray head that serves
# the model. The default command is the all-in-one `mlops up`.
FROM python:3.11-slim AS build
COPY --from=ghcr.io/astral-sh/uv:0.9 /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
WORKDIR /app
# Dependencies first: this layer is cached until the lock file changes.
COPY pyproject.toml uv.lock .python-version ./
RUN --mount=type=cache,target=/root/.cache/uv uv sync --frozen --no-dev --no-install-project
COPY . .
RUN --mount=type=cache,target=/root/.cache/uv uv sync --frozen --no-dev

FROM python:3.11-slim
# A fixed numeric user, so volume ownership and `USER` do not depend on the image's passwd file.
RUN groupadd --gid 10001 mlops \
 && useradd --create-home --uid 10001 --gid 10001 mlops \
 && mkdir -p /data/mlops /data/dagster \
 && chown -R 10001:10001 /data
WORKDIR /app
COPY --from=build --chown=10001:10001 /app /app
ENV PATH="/app/.venv/bin:$PATH" \
    MLOPS_HOME=/data/mlops \
    DAGSTER_HOME=/data/dagster \
    RAY_USAGE_STATS_ENABLED=0 \
    PYTHONUNBUFFERED=1
USER 10001:10001
VOLUME ["/data/mlops", "/data/dagster"]
EXPOSE 3000 4000 8000
# Probes MLOPS_HEALTHCHECK_URL (default: the webserver); compose.yaml sets one per service.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "/app/deploy/healthcheck.py"]
CMD ["mlops", "up", "--host", "0.0.0.0"]
