#!/usr/bin/env bash
# Set up the opt-in browser test (tests/test_browser.py, `make browser-test`): a system Chromium and
# Playwright for Python. Idempotent: does nothing when both are already there.
# Playwright drives the distribution's Chromium (Debian/Ubuntu package `chromium`); `playwright install` is
# never run, so no browser is downloaded.
#   MIRLAB_VENV      the venv made by scripts/setup.sh (default: .venv)
#   MIRLAB_CHROMIUM  a Chromium/Chrome binary to use instead of `chromium` from PATH (then nothing is apt-installed)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MIRLAB_VENV:-.venv}"

if [[ -n "${MIRLAB_CHROMIUM:-}" ]]; then
    [[ -x "$MIRLAB_CHROMIUM" ]] || { echo "MIRLAB_CHROMIUM=$MIRLAB_CHROMIUM is not an executable" >&2; exit 1; }
elif ! command -v chromium >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "no chromium found and no apt-get: install Chromium yourself and set MIRLAB_CHROMIUM=/path/to/it" >&2
        exit 1
    fi
    if [[ "$(id -u)" -eq 0 ]]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "installing chromium needs root: run 'apt-get install -y chromium' as root, then re-run" >&2
        exit 1
    fi
    echo "installing the Debian package chromium (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! "${SUDO[@]}" apt-get install -y -q chromium; then  # stale or missing package lists: refresh once
        "${SUDO[@]}" apt-get update -q
        "${SUDO[@]}" apt-get install -y -q chromium
    fi
fi

if ! "$VENV/bin/python" -c "import playwright.sync_api" >/dev/null 2>&1; then
    # only the requirements of the `browser` extra (re-installing mirlab itself is not needed)
    mapfile -t REQS < <("$VENV/bin/python" -c 'import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["browser"]))')
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${REQS[@]}"
fi
echo "browser test ready: $("${MIRLAB_CHROMIUM:-chromium}" --version 2>/dev/null | tail -1)," \
     "playwright $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("playwright"))')"
