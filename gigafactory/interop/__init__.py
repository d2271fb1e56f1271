"""Interoperability: import xAI's released Grok-1 checkpoint, export to the layouts vLLM, SGLang and transformers load.

See docs/interop.md for the exact name and shape mapping of every format.
"""

from gigafactory.interop.convert import export_checkpoint, import_grok1, import_safetensors, parameter_shapes
from gigafactory.interop.layouts import FORMATS, check_exportable, entries

__all__ = ["FORMATS", "check_exportable", "entries", "export_checkpoint", "import_grok1", "import_safetensors", "parameter_shapes"]
