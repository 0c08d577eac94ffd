"""Dataset statistics over many images."""
import streamlit as st

from t2t_viz.ui import dataset_page

dataset_page.page(st.session_state.settings)
