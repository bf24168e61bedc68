# Sourced by .ci/run: Prometheus' promtool for the deployment tests (config, exposition and
# dashboard query checks). Only the binary is unpacked from Debian's prometheus package (no
# server is installed or started); it is put on PATH for the test run.
install_promtool() {
  if command -v promtool >/dev/null 2>&1; then return 0; fi
  local dir=${MLOPS_CI_PROMTOOL_DIR:-/tmp/mlops-ci-promtool}
  if [ ! -x "$dir/promtool" ]; then
    echo "== unpacking promtool (Debian prometheus) ==" >&2
    local work
    work=$(mktemp -d /tmp/mlops-ci-promtool-deb.XXXXXX)
    chmod 777 "$work"  # apt downloads as its own user
    apt-get update -qq >&2
    (cd "$work" && apt-get download -qq prometheus >&2 && dpkg-deb -x prometheus_*.deb root)
    mkdir -p "$dir" && cp "$work/root/usr/bin/promtool" "$dir/promtool"
    rm -rf "$work"
  fi
  export PATH="$dir:$PATH"
}
