"""transformers config for Gigafactory's Grok exports (hf-grok1, sglang-grok); shipped inside each export directory.

Every field of config.json becomes an attribute; the exact architecture is the "gigafactory" block's "model" table,
which modeling_gigafactory_grok.py reads. A model_type of its own (not "git") makes transformers refuse to load the
export without `trust_remote_code=True`, instead of silently building an unrelated model.
"""

from transformers import PretrainedConfig


class GigafactoryGrokConfig(PretrainedConfig):
    model_type = "gigafactory-grok"
