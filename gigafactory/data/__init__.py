"""Data: the shipped corpus, BPE tokenizer training, token shards and the packed sequence loader."""
