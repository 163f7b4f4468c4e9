"""Time of ``gradwatch report RUN_DIR --html`` on a run whose events file holds 100k events.

    python benchmarks/report_speed.py                      # 100k events (a real fit first, ~10 s)
    python benchmarks/report_speed.py --events 20000 --keep runs/big   # keep the run folder

A real fit (the tests' digits MLP, learning rate too high, a NaN batch, every remedy on, per-layer
statistics) writes a real run folder: its events file and its TensorBoard files. Its findings and
actions are the templates: the big events file repeats them, in the order the run wrote them, with
their steps spread evenly over ``--steps`` optimizer steps, and ends with the summary line the events
sink writes (``build_summary`` over every finding and action). The TensorBoard curves are the real
run's ``gradwatch/`` tags, one point every ``--curve-every`` steps over the same span (one event per
step holding every tag, as gradwatch writes them), their values taken in turn from the real curve. Then ``gradwatch report RUN --html`` runs in a fresh process, the
way a user runs it, and the seconds it takes are printed (best of ``--repeat``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))


def real_run(root: str) -> str:
    """A short real fit with findings of several rules and actions of several remedies; its log_dir."""
    from models import DigitsMLP, digits_loaders, trainer  # tests/models.py: the tests' digits MLP

    import gradwatch

    logging.getLogger("gradwatch").setLevel(logging.CRITICAL + 1)  # the fit is only a template
    mon = gradwatch.HealthMonitor(every_n_steps=2, per_layer=True, remedies="auto", print_summary=False)
    t = trainer(root, [mon], max_steps=80, log_every_n_steps=2)
    t.fit(DigitsMLP(lr=1.5, nan_at_step=30), *digits_loaders(batch_size=16))
    return t.log_dir


def synthesize(real_dir: str, out_dir: str, events: int, steps: int, curve_every: int) -> str:
    """A run folder ``out_dir`` with ``events`` events over ``steps`` steps, shaped like ``real_dir``'s."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from gradwatch.findings import Action, Finding
    from gradwatch.sinks.events import read_events
    from gradwatch.sinks.summary import build_summary
    from gradwatch.sinks.tensorboard import scalars_summary

    written = read_events(os.path.join(real_dir, "gradwatch", "events.jsonl"))
    templates = [e for e in written if e["kind"] in ("finding", "action")]
    findings, actions = [], []
    os.makedirs(os.path.join(out_dir, "gradwatch"))
    with open(os.path.join(out_dir, "gradwatch", "events.jsonl"), "w", encoding="utf-8") as f:
        for i in range(events):
            event = {**templates[i % len(templates)], "step": steps * i // events}
            f.write(json.dumps(event) + "\n")
            if event["kind"] == "finding":
                findings.append(Finding.from_dict(event))
            else:
                actions.append(Action.from_dict(event))
        summary = build_summary(
            findings,
            actions,
            status="finished",
            steps=steps,
            epochs=1,
            remedies=["auto"],
            ranges={},
            events_path=f.name,
        )
        f.write(json.dumps({"kind": "summary", "time": time.time(), **summary}) + "\n")
    acc = EventAccumulator(real_dir, size_guidance={"scalars": 0})
    acc.Reload()
    curves = {
        t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t.startswith("gradwatch/")
    }
    writer = SummaryWriter(out_dir)
    for n, step in enumerate(range(0, steps, curve_every)):  # one event a step, every tag in it: as gradwatch
        values = {tag: v[n % len(v)] for tag, v in curves.items()}
        writer.file_writer.add_summary(scalars_summary(values), step)
    writer.close()
    return out_dir


def time_report(run: str, html: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "gradwatch", "report", run, "--html", html]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=os.path.dirname(HERE))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="findings and actions in the file")
    parser.add_argument("--steps", type=int, default=100_000, help="the optimizer steps they spread over")
    parser.add_argument("--curve-every", type=int, default=100, help="one TensorBoard point every N steps")
    parser.add_argument("--repeat", type=int, default=1, help="report this many times; the best is printed")
    parser.add_argument(
        "--keep", metavar="DIR", help="build the run folder here (kept) instead of a temp dir"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or os.path.join(tmp, "big")
        real = real_run(os.path.join(tmp, "real"))
        synthesize(real, out, args.events, args.steps, args.curve_every)
        size = os.path.getsize(os.path.join(out, "gradwatch", "events.jsonl")) / 2**20
        seconds = time_report(out, os.path.join(tmp, "report.html"), args.repeat)
        html_mib = os.path.getsize(os.path.join(tmp, "report.html")) / 2**20
    print(f"events: {args.events} ({size:.1f} MiB) over {args.steps} steps")
    print(f"gradwatch report --html: {seconds:.2f} s (page {html_mib:.1f} MiB)")


if __name__ == "__main__":
    main()
