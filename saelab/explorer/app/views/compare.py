"""The compare page (a file, so st.navigation and AppTest address it by path); the code is saelab/explorer/compare.py."""

from saelab.explorer import compare

compare.page()
