"""Where shoal keeps its files (XDG base directories), in one place."""

import os
from pathlib import Path


def default_data_dir() -> Path:
    """$XDG_DATA_HOME/shoal, else ~/.local/share/shoal."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "shoal"


def user_cards_dir(data_dir: Path) -> Path:
    """Model cards the user adds: <data-dir>/models/*.toml."""
    return data_dir / "models"


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/shoal, else ~/.cache/shoal: facts about this machine, safe to delete."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shoal"


def kernel_cache_dir() -> Path:
    """The native kernels compiled for this machine: <cache>/kernels."""
    return cache_dir() / "kernels"
