"""t2t-viz app: ``streamlit run app.py`` (see README for the launch command with sensible settings)."""
from t2t_viz.ui.page import main

main()
