"""Export: merge an adapter, save a standalone model (optionally int8/int4 or GGUF), reload and compare.

``export_model`` is ``posttrain export``; see docs/export.md. Heavy and optional pieces (torchao,
gguf) are imported only when asked for.
"""

from posttrain.export.runner import DTYPES, QUANTIZE, ExportResult, export_model

__all__ = ["DTYPES", "QUANTIZE", "ExportResult", "export_model"]
