"""PyTorch -> Orbax converters for every model family of cgn_jax (``python -m converters``)."""

from converters.common import ConversionError, StateDictReader, load_torch_state_dict
from converters.registry import FAMILIES, convert_file, convert_state_dict

__all__ = ["ConversionError", "StateDictReader", "load_torch_state_dict", "FAMILIES",
           "convert_file", "convert_state_dict"]
