"""saelab feature explorer: the Streamlit entry script (`saelab explore [RUN_OR_BUNDLE …]` starts it).

Pages are app/views/<name>.py (two lines each) calling app/saelab_app/<name>.py, wired with st.navigation;
every view's state is in the URL. Run it directly with `streamlit run app/explore.py` (bundles from
$SAELAB_EXPLORE, a JSON list of paths; default ./runs).
"""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # the page modules live next to this script (streamlit adds it; AppTest may not)
    sys.path.insert(0, HERE)

import streamlit as st  # noqa: E402

from saelab_app import state  # noqa: E402

st.set_page_config(page_title="saelab explorer", page_icon="🔬", layout="wide")

TITLES = {"overview": "Overview", "feature": "Feature", "finder": "Finder", "prompt": "Prompt",
          "steering": "Steering", "compare": "Compare"}
pages = {name: st.Page(f"views/{name}.py", title=title, url_path=name, default=name == "overview")
         for name, title in TITLES.items()}
state.PAGES.update(pages)
current = st.navigation(list(pages.values()))
try:
    current.run()
except Exception as e:  # noqa: BLE001 -- the error boundary: no traceback reaches the page
    state.internal_error(e)
