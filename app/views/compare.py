"""The compare page (a file, so st.navigation and AppTest address it by path); the code is saelab_app/compare.py."""

from saelab_app import compare

compare.page()
