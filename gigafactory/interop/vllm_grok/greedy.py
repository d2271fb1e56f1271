"""Greedy decoding of token-id prompts with vLLM's offline engine: the parity check behind
tests/interop/test_vllm_plugin.py, usable by hand on any Grok export.

    .venv-vllm/bin/python -m gigafactory.interop.vllm_grok.greedy EXPORT_DIR --prompts '[[1,5,9],[1,7]]' --out r.json

writes one JSON object (vLLM logs to stdout, so not there): {"vllm": version, "tokens": [[id, ...] per prompt], "logits": [[[id, raw logit] ...] per
step] per prompt]}. The raw logits (vLLM's logprobs_mode "raw_logits", the whole vocabulary) let the caller measure the
largest logit difference from another implementation. Runs in vLLM's own venv; imports vLLM.
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir")
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a large share of the RAM
    import vllm
    from vllm import LLM, SamplingParams

    prompts = json.loads(args.prompts)
    config = json.load(open(os.path.join(args.export_dir, "config.json")))
    vocab = config["vocab_size"]
    llm = LLM(model=args.export_dir, dtype=args.dtype, enforce_eager=True, skip_tokenizer_init=True,
              max_model_len=config["max_position_embeddings"], max_logprobs=vocab, logprobs_mode="raw_logits", seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=vocab,
                            detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    logits = [[sorted((int(i), lp.logprob) for i, lp in step.items()) for step in out.outputs[0].logprobs]
              for out in outputs]
    with open(args.out, "w") as f:
        json.dump({"vllm": vllm.__version__, "tokens": tokens, "logits": logits}, f)


if __name__ == "__main__":
    main()
