"""t2t-viz app: ``streamlit run app.py`` (server settings in .streamlit/config.toml)."""
from t2t_viz.ui.app import main

main()
