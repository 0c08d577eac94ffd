#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it, editable, with the given extras
# (default: app). Idempotent and quiet: reinstalls only when pyproject.toml or the extras change.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-app}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=".venv/.installed-$( (cat pyproject.toml; echo "$extras") | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet --quiet -e ".[$extras]"
    touch "$stamp"
fi
