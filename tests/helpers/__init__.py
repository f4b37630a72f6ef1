"""Builders shared by tests: tiny random models, in-memory weight sources."""
