"""Hugging Face `transformers` export: `export_hf` writes a checkpoint as a directory that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads without fope_lm (docs/hf_export.md)."""

from fope_lm.hf.export import ExportError, export_hf

__all__ = ["ExportError", "export_hf"]
