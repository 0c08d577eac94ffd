#!/usr/bin/env bash
# Install into .venv and start the app on http://localhost:8501 (extra arguments go to streamlit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh requirements.txt
# Torch uses every core for one forward pass; Streamlit's file watcher is off for a served app.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec .venv/bin/streamlit run app.py --server.fileWatcherType none --browser.gatherUsageStats false "$@"
