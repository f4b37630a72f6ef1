"""Open the weights at a path, whatever their format."""

from pathlib import Path

from shoal.errors import ModelNotFound
from shoal.models.gguf import GGUFSource
from shoal.models.safetensors import SafetensorsSource

EXPECTED = "a GGUF file or a Hugging Face model directory with config.json"


def open_weights(path: Path) -> GGUFSource | SafetensorsSource:
    """The weight source at path; ModelNotFound when there is none there."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return SafetensorsSource(path)
        raise ModelNotFound(f"{path}: a directory without config.json; expected {EXPECTED}")
    if path.is_file():
        with path.open("rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return GGUFSource(path)
        raise ModelNotFound(f"{path}: not a GGUF file; expected {EXPECTED}")
    raise ModelNotFound(f"{path}: no such file or directory; expected {EXPECTED}")
