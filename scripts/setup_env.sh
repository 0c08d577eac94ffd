#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it, editable, with the given extras
# (default: app), then `t2t-viz prepare`. Idempotent and quiet: reinstalls only when pyproject.toml or
# the extras change.
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
    # what the app's first start would do (build the models on the meta device, trace their memory
    # estimates), done once here, as pip compiles .pyc files
    .venv/bin/t2t-viz prepare >/dev/null || echo "t2t-viz prepare failed: the app's first start does its work" >&2
    touch "$stamp"
fi
