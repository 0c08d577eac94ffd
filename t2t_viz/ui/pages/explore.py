"""Explore one image: feature maps, compare, procedures, T2T stages, attention, norms, dead channels."""
import streamlit as st

from t2t_viz.ui import explore

explore.page(st.session_state.settings)
