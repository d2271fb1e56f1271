"""transformers code copied into every hf-grok1 / sglang-grok export (see layouts.REMOTE_CODE)."""
