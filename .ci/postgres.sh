# Sourced by .ci/run: a throwaway PostgreSQL on 127.0.0.1 for the "PostgreSQL by configuration"
# tests. Installs Debian's server when it is missing; stops exactly the server it started.
pg_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$dir" ]; then
    echo "== installing PostgreSQL (Debian) ==" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2
    dir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
  echo "$dir"
}

start_postgres() {
  local bin port=${MLOPS_CI_PG_PORT:-55432}
  bin=$(pg_bin)
  PG_DIR=$(mktemp -d /tmp/mlops-ci-pg.XXXXXX)
  chown postgres:postgres "$PG_DIR" 2>/dev/null || true
  local as=(runuser -u postgres --)
  [ "$(id -u)" -ne 0 ] && as=()
  "${as[@]}" "$bin/initdb" -D "$PG_DIR/data" -U mlops --auth=trust -E UTF8 >/dev/null
  "${as[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
    -o "-h 127.0.0.1 -p $port -k $PG_DIR" start >/dev/null
  "${as[@]}" "$bin/createdb" -h 127.0.0.1 -p "$port" -U mlops reference
  PG_STOP=("${as[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -m fast -w stop)
  export MLOPS_TEST_POSTGRES_URL="postgresql+psycopg://mlops@127.0.0.1:$port/reference"
}

stop_postgres() {
  if [ -n "${PG_STOP:-}" ]; then "${PG_STOP[@]}" >/dev/null 2>&1 || true; fi
  [ -n "${PG_DIR:-}" ] && rm -rf "$PG_DIR"
}
