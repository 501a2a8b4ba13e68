"""The steering page (a file, so st.navigation and AppTest address it by path); the code is saelab_app/steering.py."""

from saelab_app import steering

steering.page()
