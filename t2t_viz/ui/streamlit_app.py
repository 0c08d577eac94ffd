"""The app as ``t2t-viz app`` serves it from an installed package (``app.py`` in a checkout does the same)."""
import os

# before PyTorch loads: its large CPU tensors on 2 MB pages (README, Memory), if the user has not chosen
os.environ.setdefault('THP_MEM_ALLOC_ENABLE', '1')
from t2t_viz.ui.app import main  # noqa: E402

main()
