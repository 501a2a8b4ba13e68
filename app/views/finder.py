"""The finder page (a file, so st.navigation and AppTest address it by path); the code is saelab_app/finder.py."""

from saelab_app import finder

finder.page()
