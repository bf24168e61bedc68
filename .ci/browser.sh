# Sourced by .ci/run: Debian's headless Chromium for the real-browser UI test
# (tests/test_ui_browser.py drives it with Playwright; no browser download).
install_chromium() {
  local bin
  bin=$(command -v chromium || true)
  if [ -z "$bin" ]; then
    echo "== installing Chromium (Debian) ==" >&2
    local sudo=()
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then sudo=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq >&2
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium >&2
    bin=$(command -v chromium)
  fi
  export MLOPS_CHROMIUM="$bin"
}
