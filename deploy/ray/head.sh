#!/bin/sh
# The compose deployment's Ray head: Ray, then Serve's HTTP proxy on the published port, then
# the last champion redeployed if the registry has one (after a restart of this container).
# The `served_model` asset swaps new champions in later through Ray Client (RAY_ADDRESS).
set -eu
port="${MLOPS_SERVE_PORT:-8000}"
ray start --head --block --port=6379 --ray-client-server-port=10001 \
  --num-cpus="${RAY_NUM_CPUS:-2}" --include-dashboard=true --dashboard-host=127.0.0.1 \
  --metrics-export-port=8080 --disable-usage-stats &
head_pid=$!
trap 'kill -TERM "$head_pid"; wait "$head_pid"' TERM INT
until ray status --address=127.0.0.1:6379 >/dev/null 2>&1; do
  kill -0 "$head_pid" 2>/dev/null || exit 1
  sleep 1
done
serve start --address=127.0.0.1:6379 --http-host 0.0.0.0 --http-port "$port"
if [ -f "${MLOPS_HOME:-/data/mlops}/registry/aliases.json" ]; then
  # The token, when set, goes into a private copy of the config, never into the image.
  config=$(mktemp /tmp/serve-config.XXXXXX)
  python - "$config" <<'PY'
import os
import sys

import yaml

config = yaml.safe_load(open("/app/deploy/ray/serve.yaml"))
if os.environ.get("MLOPS_API_TOKEN"):
    config["applications"][0]["args"]["api_token"] = os.environ["MLOPS_API_TOKEN"]
with open(sys.argv[1], "w") as out:
    yaml.safe_dump(config, out)
PY
  serve deploy --address http://127.0.0.1:8265 "$config" \
    || echo "no champion redeployed: materialize served_model" >&2
  rm -f "$config"
fi
wait "$head_pid"
