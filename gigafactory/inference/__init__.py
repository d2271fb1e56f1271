"""Inference: load a checkpoint for generation, KV-cached decoding and sampling."""
