"""The steering page (a file, so st.navigation and AppTest address it by path); the code is saelab/explorer/steering.py."""

from saelab.explorer import steering

steering.page()
