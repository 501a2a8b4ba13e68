"""The feature page (a file, so st.navigation and AppTest address it by path); the code is saelab/explorer/feature.py."""

from saelab.explorer import feature

feature.page()
