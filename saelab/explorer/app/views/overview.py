"""The overview page (a file, so st.navigation and AppTest address it by path); the code is saelab/explorer/overview.py."""

from saelab.explorer import overview

overview.page()
