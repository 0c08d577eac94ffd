"""The app as ``t2t-viz app`` serves it from an installed package (``app.py`` in a checkout does the same)."""
from t2t_viz.ui.app import main

main()
