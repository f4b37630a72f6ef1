"""Frozen, pure data types shared by every layer. Imports nothing from the rest of shoal."""
