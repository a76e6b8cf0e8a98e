#!/usr/bin/env bash
# Create (or reuse) .venv and install qgraph with its pinned dependencies (torch 2.13.0 CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[dev]"
