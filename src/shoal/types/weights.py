"""Names of the torch engine's number formats, shared by settings, cards and runner configs."""

from typing import Literal, get_args

# How the projections' weights are kept: none = the engine's dtype; see engines/torch/quant.py.
Quant = Literal["none", "fp16", "int8", "int4"]
QUANTS: tuple[Quant, ...] = get_args(Quant)

# Activations and KV cache of the torch engine.
DType = Literal["float32", "float16", "bfloat16"]
