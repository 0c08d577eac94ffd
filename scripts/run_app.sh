#!/usr/bin/env bash
# Install into .venv, then serve the app on http://localhost:8501 (extra arguments go to streamlit;
# server settings are in .streamlit/config.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh app
exec .venv/bin/streamlit run app.py "$@"
