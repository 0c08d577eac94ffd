"""t2t-viz app: ``streamlit run app.py`` (server settings in .streamlit/config.toml)."""
import os

# before PyTorch loads: its large CPU tensors on 2 MB pages (README, Memory), if the user has not chosen
os.environ.setdefault('THP_MEM_ALLOC_ENABLE', '1')
from t2t_viz.ui.app import main  # noqa: E402

main()
