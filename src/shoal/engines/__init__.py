"""Engines run one layer range of a model. Frameworks are imported lazily (see registry.py)."""
