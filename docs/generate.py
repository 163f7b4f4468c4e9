"""Write docs/rules.md and docs/remedies.md from the code, so the docs say what the code does.

    python docs/generate.py          # rewrite both files
    python docs/generate.py --check  # exit 1 if either is out of date (tests/test_docs.py runs this)

Each rule's section is its detector's docstring (formula, thresholds, sources), its constructor
defaults, its advice and the remedies that answer it; each remedy's, its docstring and defaults.
"""

from __future__ import annotations

import inspect
import os
import sys

from gradwatch.detectors import REGISTRY as DETECTORS
from gradwatch.findings import REMEDIES, RULES
from gradwatch.remedies import LADDER
from gradwatch.remedies import REGISTRY as REMEDY_CLASSES

HERE = os.path.dirname(os.path.abspath(__file__))


def _defaults(cls: type) -> str:
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.default is not p.empty]
    return ", ".join(f"`{p.name}={p.default!r}`" for p in params) or "none"


def _doc(cls: type) -> str:
    return inspect.cleandoc(cls.__doc__ or "")


def rules() -> str:
    out = [
        "# Rules",
        "",
        "Generated from the code by `python docs/generate.py`: each section is the detector's own docstring.",
        "A rule is a `Detector` (one module in `gradwatch/detectors/`): a pure `check(step, stats) -> list[Finding]`",
        "with its state in `state_dict()`. Findings are de-duplicated by episode: one when a condition starts,",
        "one when it worsens (higher severity), an `info` one when it ends. Thresholds are constructor",
        "arguments: `HealthMonitor(detectors=[GradientSpike(z=6), ...])` replaces the default set. Each section",
        "says what the rule assumes about the signal it judges; `HealthMonitor(loss=...)` declares what the",
        'training loss is (`"minimize"`, `"signed"`, `"surrogate"`: see docs/monitor.md).',
        "",
        "| rule | class | answered by |",
        "|---|---|---|",
    ]
    for rule in RULES:
        cls = DETECTORS[rule]
        out.append(
            f"| [`{rule}`](#{rule}) | `{cls.__name__}` | {', '.join(LADDER.get(rule, ())) or 'advice only'} |"
        )
    for rule in RULES:
        cls = DETECTORS[rule]
        out += [
            "",
            f"## {rule}",
            "",
            f"`gradwatch.detectors.{cls.__name__}` — defaults: {_defaults(cls)}",
            "",
            _doc(cls),
        ]
        if getattr(cls, "assumes", ""):
            kinds = ", ".join(f'`"{k}"`' for k in getattr(cls, "loss_kinds", ()))
            out += ["", f"**Assumes.** {cls.assumes} Judged for `loss=` {kinds}."]
        advice = getattr(cls, "advice", "")
        if advice:
            out += ["", f"**Advice.** {advice}"]
        ladder = LADDER.get(rule)
        out += ["", f"**Remedy.** {' then '.join(f'`{r}`' for r in ladder)}." if ladder else "", ""]
        if not ladder:
            out[-2] = (
                "**Remedy.** None: the fix is in the user's code or data; the finding says what to change."
            )
    return "\n".join(out).rstrip() + "\n"


def remedies() -> str:
    out = [
        "# Remedies",
        "",
        'Generated from the code by `python docs/generate.py`. `HealthMonitor(remedies="auto")` (the default)',
        'enables all of them with these defaults; `remedies="off"` observes only; a list picks some, e.g.',
        "`remedies=[SkipStep(), ReduceLR(factor=0.3)]`. Every action is an `Action` in `monitor.actions`, the",
        "events file (`kind: action`), TensorBoard text and the log, with before/after numbers. Cooldowns",
        "(`cooldown_steps`) and budgets (`budget`) are enforced by the base class. A finding gets one action:",
        "the first remedy of its ladder that acts. When a critical condition persists and every remedy that",
        "answers it has spent its budget, `early_stop` stops the run with a critical finding saying what was tried.",
        "",
        "| rule | ladder |",
        "|---|---|",
    ]
    out += [f"| `{rule}` | {' then '.join(f'`{r}`' for r in ladder)} |" for rule, ladder in LADDER.items()]
    for name in REMEDIES:
        cls = REMEDY_CLASSES[name]
        out += [
            "",
            f"## {name}",
            "",
            f"`gradwatch.remedies.{cls.__name__}` — defaults: {_defaults(cls)}",
            "",
            _doc(cls),
        ]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for name, text in (("rules.md", rules()), ("remedies.md", remedies())):
        path = os.path.join(HERE, name)
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
        if current != text:
            stale.append(name)
            if "--check" not in argv:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    if stale and "--check" in argv:
        print(f"out of date: {', '.join(stale)}; run python docs/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
