"""The feature page (a file, so st.navigation and AppTest address it by path); the code is saelab_app/feature.py."""

from saelab_app import feature

feature.page()
