"""The ``gradwatch`` command line: ``gradwatch report RUN_DIR [--html report.html]``."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from gradwatch import __version__

    parser = argparse.ArgumentParser(prog="gradwatch", description="gradwatch: training-health monitor.")
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser(
        "report",
        help="print a run's health summary (and write an HTML report)",
        description="Read a run's gradwatch events file and TensorBoard event files and print its health: "
        "verdict, rules fired, actions taken and the statistics that matter.",
    )
    report.add_argument(
        "run_dir", metavar="RUN_DIR", help="the run folder (trainer.log_dir), or its events.jsonl"
    )
    report.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report with plots")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradwatch`` console script and of ``python -m gradwatch``."""
    args = _parser().parse_args(argv)
    from gradwatch.report import ReportError, load_run, render_text, write_html

    try:
        run = load_run(args.run_dir)
    except ReportError as err:
        print(f"gradwatch report: {err}", file=sys.stderr)
        return 2
    print(render_text(run))
    if args.html:
        try:
            write_html(run, args.html)
        except ImportError as err:
            print(
                f"gradwatch report --html needs matplotlib ({err}); install it with: "
                "pip install 'gradwatch[report]'",
                file=sys.stderr,
            )
            return 2
        print(f"HTML report: {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
