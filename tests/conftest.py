"""Shared pytest setup. Its presence (with tests/__init__.py) puts the repo root on sys.path."""
