#!/usr/bin/env bash
# One entry point for a fresh machine:
#   ./run.sh          install (first time) and run the system: `serve` when weights are present
#                     under MODELS_DIR, else the self-contained demo on tiny models
#   ./run.sh test     install (first time) and run the whole test suite
#   ./run.sh <args>   install and run `python -m bridge <args>`
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

setup() {
    local stamp="$VENV/.installed" want
    want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    echo "setting up $VENV (first run takes a minute or two)…" >&2
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch pinned exactly: a looser pin can pull a multi-GB CUDA build onto a CPU machine.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    # constraints.txt: the versions the suite ran with (the Dockerfile installs with it too).
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[cpu,test]"
    echo "$want" > "$stamp"
}

setup
case "${1:-}" in
    test)
        shift
        exec "$VENV/bin/python" -m pytest -q "$@"
        ;;
    "")
        # serve runs with whatever weights are there (the rest are picked up when they appear);
        # with none at all, the demo on tiny models.
        if "$VENV/bin/python" -m bridge weights --any >/dev/null 2>&1; then
            exec "$VENV/bin/python" -m bridge serve
        fi
        echo "no model weights under MODELS_DIR (${MODELS_DIR:-/workspace/models}): running the demo on tiny models" >&2
        exec "$VENV/bin/python" -m bridge demo
        ;;
    *)
        exec "$VENV/bin/python" -m bridge "$@"
        ;;
esac
