"""Greedy decoding of token-id prompts with vLLM's offline engine: the parity check behind
tests/interop/test_vllm_plugin.py, usable by hand on any Grok export.

    .venv-vllm/bin/python -m gigafactory.interop.vllm_grok.greedy EXPORT_DIR [EXPORT_DIR ...] \
        --prompts '[[1,5,9],[1,7]]' --max-tokens 16 --out result.json

writes one JSON object (vLLM logs to stdout, so not there): {"vllm": version, "runs": {export_dir: {"tokens": [[id,
...] per prompt], "logits": [[[id, raw logit] ... per step] per prompt]}}}. The raw logits (vLLM's logprobs_mode
"raw_logits", whole vocabulary) let the caller measure the largest logit difference from another implementation.
The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0: no second interpreter to start, about half the
start-up time on 2 cores), one export after the other. Runs in vLLM's own venv; imports vLLM.
"""

from __future__ import annotations

import argparse
import gc
import json
import os


def decode(export_dir: str, prompts: list[list[int]], max_tokens: int, dtype: str, tensor_parallel: int = 1) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    with open(os.path.join(export_dir, "config.json")) as f:
        config = json.load(f)
    vocab = config["vocab_size"]
    llm = LLM(model=export_dir, dtype=dtype, enforce_eager=True, skip_tokenizer_init=True, seed=0,
              tensor_parallel_size=tensor_parallel,
              max_model_len=config["max_position_embeddings"], max_logprobs=vocab, logprobs_mode="raw_logits")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=vocab, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    result = {
        "tokens": [list(out.outputs[0].token_ids) for out in outputs],
        "logits": [[sorted((int(i), lp.logprob) for i, lp in step.items()) for step in out.outputs[0].logprobs]
                   for out in outputs],
    }
    del llm, outputs
    gc.collect()
    cleanup_dist_env_and_memory()  # the next export's engine sets up its own (single-process) group
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dirs", nargs="+")
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a large share of the RAM
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm

    prompts = json.loads(args.prompts)
    runs = {d: decode(d, prompts, args.max_tokens, args.dtype, args.tensor_parallel_size) for d in args.export_dirs}
    with open(args.out, "w") as f:
        json.dump({"vllm": vllm.__version__, "runs": runs}, f)


if __name__ == "__main__":
    main()
