"""Compare two folders of events files: the findings and actions each holds, event by event.

    python benchmarks/compare_events.py /tmp/before/zoo_events /tmp/after/zoo_events

For a change that must not alter behaviour (a refactor): every file's findings and actions must match in
kind, rule, severity, step, layer and remedy; messages are compared too, and differences are listed.
Exit status 1 if any event differs in those fields.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gradwatch.sinks.events import read_events  # noqa: E402

KEYS = ("kind", "rule", "severity", "step", "layer", "remedy")


def events(path: str) -> list[dict]:
    return [e for e in read_events(path) if e.get("kind") in ("finding", "action")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    args = parser.parse_args(argv)
    names = sorted({f for d in (args.before, args.after) for f in os.listdir(d) if f.endswith(".jsonl")})
    differ = messages = total = 0
    for name in names:
        a = events(os.path.join(args.before, name)) if os.path.exists(os.path.join(args.before, name)) else []
        b = events(os.path.join(args.after, name)) if os.path.exists(os.path.join(args.after, name)) else []
        total += len(a)
        ka, kb = [tuple(e.get(k) for k in KEYS) for e in a], [tuple(e.get(k) for k in KEYS) for e in b]
        if ka != kb:
            differ += 1
            print(f"{name}: {len(a)} events before, {len(b)} after")
            for x in sorted(set(ka) - set(kb)):
                print("   only before:", x)
            for x in sorted(set(kb) - set(ka)):
                print("   only after: ", x)
            continue
        for ea, eb in zip(a, b, strict=True):
            if ea.get("message") != eb.get("message"):
                messages += 1
                print(f"{name}: message at step {ea.get('step')} ({ea.get('rule')}):")
                print("   before:", ea.get("message"))
                print("   after: ", eb.get("message"))
    print(f"{len(names)} files, {total} events before: {differ} files differ in findings/actions, "
          f"{messages} messages differ")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
