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
  serve deploy --address http://127.0.0.1:8265 /app/deploy/ray/serve.yaml \
    || echo "no champion redeployed: see the served_model asset" >&2
fi
wait "$head_pid"
