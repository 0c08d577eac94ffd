"""The paper's Figure 2 on the user's image."""
import streamlit as st

from t2t_viz.ui import figure2

figure2.page(st.session_state.settings)
