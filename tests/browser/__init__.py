"""Helpers for tests/test_browser.py: a private JupyterLab driven in headless Chromium."""
