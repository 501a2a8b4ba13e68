"""The overview page (a file, so st.navigation and AppTest address it by path); the code is saelab_app/overview.py."""

from saelab_app import overview

overview.page()
