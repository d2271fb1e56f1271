"""`gigafactory generate`: sample text from a checkpoint, streamed to the terminal."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="Generate text from a trained checkpoint (KV cache, temperature/top-k/top-p, streaming).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="A run directory, its checkpoints/ directory, or one checkpoints/step-N directory.")
    parser.add_argument("--prompt", required=True, help="Text to continue (plain text: '[EOS]' or '<|user|>' in it are characters, not control tokens).")
    parser.add_argument("--max-tokens", type=int, default=100, help="Most new tokens to generate.")
    parser.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature; 0 = greedy.")
    parser.add_argument("--top-k", type=int, default=0, help="Sample only among the k most likely tokens; 0 = off.")
    parser.add_argument("--top-p", type=float, default=0.95, help="Nucleus sampling: the smallest set of tokens with this total probability.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed of the sampler (any integer).")
    parser.add_argument("--no-cache", action="store_true", help="Recompute the whole prefix every step instead of using the KV cache.")
    parser.add_argument("--ignore-eos", action="store_true", help="Keep generating past the end-of-document token.")
    parser.add_argument("--device", default="cpu", help="Device to run on (cpu, cuda or cuda:N).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gigafactory.data.tokenizer import plain_text_encoder
    from gigafactory.errors import UserError
    from gigafactory.inference.generate import check_device, generate_tokens, load_for_inference, stream_text
    from gigafactory.inference.sampling import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_tokens=args.max_tokens)
    params.validate()
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the OS could not decode arrive as lone surrogates
        raise UserError("--prompt is not valid UTF-8 text; pass the prompt in UTF-8") from None
    check_device(args.device)
    loaded = load_for_inference(args.checkpoint, args.device)
    prompt_ids = plain_text_encoder(loaded.tokenizer).encode(args.prompt).ids
    sys.stdout.write(args.prompt)
    for piece in stream_text(loaded.tokenizer, generate_tokens(loaded.model, prompt_ids, params, args.seed, use_cache=not args.no_cache, stop_at_eos=not args.ignore_eos)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
