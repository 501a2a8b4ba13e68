"""saelab feature explorer: the Streamlit entry script (`saelab explore [RUN_OR_BUNDLE …]` starts it by path).

Pages are views/<name>.py next to this script (two lines each, so st.navigation and AppTest address them by file)
calling saelab/explorer/<name>.py, wired with st.navigation; every view's state is in the URL. Run it directly with
`streamlit run saelab/explorer/app/explore.py` (bundles from $SAELAB_EXPLORE, a JSON list of paths; default ./runs).
"""

import streamlit as st

from saelab.explorer import state

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
