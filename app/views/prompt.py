"""The prompt page (a file, so st.navigation and AppTest address it by path); the code is saelab_app/prompt.py."""

from saelab_app import prompt

prompt.page()
