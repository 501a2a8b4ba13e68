"""The prompt page (a file, so st.navigation and AppTest address it by path); the code is saelab/explorer/prompt.py."""

from saelab.explorer import prompt

prompt.page()
