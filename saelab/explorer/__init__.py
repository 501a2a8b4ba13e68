"""The feature explorer (Streamlit + Plotly), the top floor of the flow: it reads dashboard bundles through
`saelab.dashboard.open` and nothing in saelab imports it. `saelab explore` starts its entry script, app/explore.py,
by path; the modules here hold each page's code, the shared state and the rendering (see README.md).
"""
