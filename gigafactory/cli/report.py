"""`gigafactory report RUN_DIR`: steps, tokens, failures, time lost and ETTR of a run, with loss/throughput plots."""

from __future__ import annotations

import argparse
import os
import sys

EXIT_SIGPIPE = 128 + 13  # what a shell reports for a tool stopped by SIGPIPE (`report RUN | head -1`)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="Summarise a training run: steps, tokens, failures, time lost, ETTR; plots loss and throughput.",
        description="Read RUN_DIR/metrics.jsonl and RUN_DIR/events.jsonl; print a summary and write PNG plots and an HTML page.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="The logging.run_dir of a `gigafactory train` run (a directory).")
    p.add_argument("--out", metavar="DIR", help="Where to write loss.png, throughput.png and report.html (default RUN_DIR/report).")
    p.add_argument("--no-plots", action="store_true", help="Print the summary only.")
    p.add_argument("--json", action="store_true", help="Print the summary as JSON.")
    p.add_argument("--events-file", default="events.jsonl", help="Events file name inside RUN_DIR (resilience.events_file).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gigafactory.resilience import ft_report
    from gigafactory.resilience.report import format_summary, summary_json
    from gigafactory.resilience.report_files import build_report

    if ft_report.is_replica_run(args.run_dir):  # a fault-tolerant run: one directory per replica group
        s = ft_report.build_replica_report(args.run_dir, args.out, plots=not args.no_plots)
        text = ft_report.replica_summary_json(s) if args.json else ft_report.format_replica_summary(s)
    else:
        s = build_report(args.run_dir, args.out, plots=not args.no_plots, events_file=args.events_file)
        text = summary_json(s) if args.json else format_summary(s)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as the Python docs recommend
        try:  # point stdout at devnull so the flush at interpreter exit does not raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_SIGPIPE
    return 0
