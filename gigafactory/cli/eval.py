"""`gigafactory eval`: held-out perplexity and the KJV instruction task's exact match for a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from gigafactory.cli.paths import json_file, out_dir
from gigafactory.errors import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        allow_abbrev=False,
        help="Evaluate a checkpoint: held-out perplexity and the KJV instruction task (exact match).",
        description=("Held-out perplexity of the pre-training data and the KJV instruction task's exact match (greedy, "
                     "serve's chat template) and answer loss; writes JSON and a markdown table. --write-task DIR "
                     "writes the task's train/test chat files (for `gigafactory sft --data`) and DPO pair files instead; --compare A.json "
                     "B.json compares two results item by item (paired CIs and exact McNemar tests)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", metavar="RUN", help="Run directory or checkpoints/step-N directory.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N.")
    parser.add_argument("--limit", type=int, default=200, help="Test items of the KJV task to score (at most 200).")
    parser.add_argument("--pref-limit", type=int, default=0,
                        help="Held-out items whose preference pairs are scored (teacher-forced, cheap): 0 = every held-out item (1,266).")
    parser.add_argument("--rejected", default="near,far", metavar="near,far",
                        help="Rejected-answer constructions: for the held-out preference pairs, and the DPO pair files --write-task writes "
                             "(near: neighbouring chapter / two words swapped; far: another book's chapter / sentence).")
    parser.add_argument("--pref-data", action="append", default=[], metavar="PAIRS.jsonl",
                        help="Also score the preference accuracy on this {prompt, chosen, rejected} file (e.g. DPO's own training "
                             "pairs, to set in-sample against held-out accuracy); repeatable.")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                        help="Compare two eval results item by item (paired: bootstrap 95%% CI of B - A, exact McNemar test); "
                             "prints a table, writes --out if given.")
    parser.add_argument("--ppl-batches", type=int, default=8, help="Held-out batches (of 4 sequences) for the perplexity.")
    parser.add_argument("--out", default="", type=json_file, help="JSON file to write (a .md table beside it); default RUN/eval-step-N.json.")
    parser.add_argument("--write-task", metavar="DIR", default="", type=out_dir, help="Write kjv-train.jsonl and kjv-test.jsonl to DIR and exit.")
    parser.add_argument("--harness-tasks", default="", metavar="T1,T2", help="Also run these lm-evaluation-harness tasks on the checkpoint (needs lm-eval).")
    parser.add_argument("--harness-include", default="", metavar="DIR", help="A directory of lm-eval task YAML files (local data, no download) for --harness-tasks.")
    parser.add_argument("--harness-limit", type=int, default=0, help="Documents per harness task (0 = all).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gigafactory.posttrain.evaluate import evaluate_checkpoint, table, write_results
    from gigafactory.posttrain.tasks import REJECTED, write_task

    rejected = tuple(r.strip() for r in args.rejected.split(",") if r.strip())
    if not rejected or set(rejected) - set(REJECTED):
        raise UserError(f"--rejected takes a comma list of {', '.join(REJECTED)}; got '{args.rejected}'")
    if args.compare:
        return compare(args)
    if args.write_task:
        for name, path in write_task(args.write_task, rejected).items():
            print(f"{name}: {path} ({sum(1 for _ in path.open())} items)")
        return 0
    if not args.checkpoint:
        raise UserError("eval needs --checkpoint RUN (or --write-task DIR)")
    if args.limit < 1 or args.ppl_batches < 1:
        raise UserError("--limit and --ppl-batches must be >= 1")
    harness = {}
    if args.harness_tasks:  # first: a bad task name fails before the slow part
        from gigafactory.posttrain.harness import run_harness

        tasks = [t.strip() for t in args.harness_tasks.split(",") if t.strip()]
        out = run_harness(args.checkpoint, tasks, args.harness_include, args.harness_limit or None, args.device)
        harness = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))} for task, metrics in out["results"].items()}
    result = evaluate_checkpoint(args.checkpoint, args.device, args.limit, args.ppl_batches, args.pref_limit, rejected, tuple(args.pref_data))
    if harness:
        result["harness"] = harness
    ckpt = Path(result["checkpoint"])
    out = Path(args.out).expanduser() if args.out else ckpt.parent.parent / f"eval-{ckpt.name}.json"
    json_path, md_path = write_results(result, out)
    print(table(result))
    print(f"wrote {json_path} and {md_path}")
    return 0


def compare(args: argparse.Namespace) -> int:
    import json

    from gigafactory.posttrain.paired import compare_results, comparison_table, load_result

    result = compare_results(*(load_result(p) for p in args.compare))
    print(comparison_table(result))
    if args.out:
        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(comparison_table(result) + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0
