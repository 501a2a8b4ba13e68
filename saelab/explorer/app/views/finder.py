"""The finder page (a file, so st.navigation and AppTest address it by path); the code is saelab/explorer/finder.py."""

from saelab.explorer import finder

finder.page()
