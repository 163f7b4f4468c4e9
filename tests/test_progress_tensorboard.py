"""The progress bar's health status and TensorBoard's per-block layout and text, on real fits."""

from __future__ import annotations

import glob
import io
import os
import re
from contextlib import redirect_stdout

import pytorch_lightning as pl
from models import DigitsMLP, digits_loaders, trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

import gradwatch
from gradwatch.findings import Action


class Peek(pl.Callback):
    """Reads what the progress bar would show, through its public ``get_metrics``, at chosen steps."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen[trainer.global_step] = trainer.progress_bar_callback.get_metrics(trainer, pl_module)[
            "health"
        ]


def test_tqdm_progress_bar_shows_health(tmp_path, loaders):
    mon = gradwatch.HealthMonitor(every_n_steps=5, remedies="off")
    peek = Peek()
    bar = pl.callbacks.TQDMProgressBar()  # Lightning's default bar (RichProgressBar when rich is installed)
    t = trainer(tmp_path, [mon, peek, bar], max_steps=10, logger=False, enable_progress_bar=True)
    assert t.progress_bar_callback is bar
    out = io.StringIO()
    with redirect_stdout(out):  # Lightning's tqdm bars write to stdout
        t.fit(DigitsMLP(nan_at_step=3), loaders[0])
    # the NaN at step 3 is read at step 5, with the weights it corrupted: ok until then, then two criticals
    assert peek.seen[1] == peek.seen[5] == "ok"
    assert peek.seen[6] == peek.seen[10] == "2 crit"
    assert "health=ok" in out.getvalue() and "health=2 crit" in out.getvalue()  # what tqdm printed
    # after fit the wrapper is gone: the bar is the user's again
    assert "get_metrics" not in vars(t.progress_bar_callback)


class ReadCount(list):
    """A findings list that counts the findings read from it (by iteration or by index)."""

    reads = 0

    def __iter__(self):
        for f in super().__iter__():
            self.reads += 1
            yield f

    def __getitem__(self, i):
        got = super().__getitem__(i)
        self.reads += len(got) if isinstance(i, slice) else 1
        return got


def test_progress_bar_counts_each_finding_once(tmp_path, loaders):
    """Warnings, then criticals, then an info over 60 steps: at each step the bar shows the counts of
    every finding so far (the reference: ``health_status`` over all of them), and its refreshes read no
    finding at all: they read the journal's running totals."""
    from gradwatch.progress import health_status

    mon = gradwatch.HealthMonitor(every_n_steps=2, remedies="off", print_summary=False)
    shown: dict[int, tuple[str, int]] = {}
    refresh_reads = []

    class PeekCounts(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # the fit's own list (a new fit starts a new one)
            mon.monitor.findings = ReadCount(mon.monitor.findings)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            before = mon.monitor.findings.reads
            status = trainer.progress_bar_callback.get_metrics(trainer, pl_module)["health"]
            refresh_reads.append(mon.monitor.findings.reads - before)
            shown[trainer.global_step] = (status, len(mon.monitor.findings))

    bar = pl.callbacks.TQDMProgressBar()
    t = trainer(tmp_path, [mon, PeekCounts(), bar], max_steps=60, logger=False, enable_progress_bar=True)
    with redirect_stdout(io.StringIO()):
        t.fit(DigitsMLP(lr=1.5, nan_at_step=30), digits_loaders(batch_size=16)[0])
    findings = mon.monitor.findings
    assert (
        isinstance(findings, ReadCount)
        and len(findings) >= 5
        and {f.severity.value for f in findings} == {"info", "warning", "critical"}
    )
    for step, (status, n) in shown.items():
        assert status == health_status(list.__getitem__(findings, slice(0, n))), step
    statuses = [status for status, _ in shown.values()]
    assert statuses[0] == "ok" and statuses[-1] == health_status(list(findings)) != "ok"
    assert len(set(statuses)) >= 4  # the counts changed several times during the fit
    assert sum(refresh_reads) == 0  # the totals, not the list: the same cost after a million findings


def test_health_status_counts_warnings_and_criticals():
    from gradwatch.findings import Finding
    from gradwatch.progress import health_status

    def f(sev):
        return Finding("dead_units", sev, 1, 0, "a", "m")

    assert health_status([f("info")]) == "ok"
    assert health_status([f("warning"), f("warning")]) == "2 warn"
    assert health_status([f("warning"), f("critical")]) == "1 crit, 1 warn"


def _acc(logdir: str) -> EventAccumulator:
    (path,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    acc = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_custom_scalars_group_each_block_and_actions_are_text(tmp_path, loaders):
    mon = gradwatch.HealthMonitor(every_n_steps=5, per_layer=True, remedies="off")

    class ActAt3(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                mon.monitor.record_action(
                    Action("skip_step", 3, "nonfinite", {"skipped": 1}, message="skipped")
                )

    t = trainer(tmp_path, [mon, ActAt3()], max_steps=10)
    t.fit(DigitsMLP(nan_at_step=3), loaders[0])
    acc = _acc(t.logger.log_dir)
    config = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(config)
    categories = {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}
    assert {"gradwatch", "gradwatch block: net", "gradwatch block: head"} <= set(categories)
    tags = acc.Tags()["scalars"]

    def matched(regexes):
        return sorted(t for t in tags if any(re.search(r, t) for r in regexes))

    net, head = categories["gradwatch block: net"], categories["gradwatch block: head"]
    assert matched(net["loss (train, val)"]) == ["gradwatch/loss/train"]
    assert matched(net["gradient norm"]) == ["gradwatch/grad_norm/net.0", "gradwatch/grad_norm/net.2"]
    assert matched(head["update / weight ratio"]) == ["gradwatch/update_ratio/head"]
    assert matched(net["activations: zero / dead fraction"]) == [
        f"gradwatch/activations/net.{i}/{f}" for i in range(4) for f in ("dead_unit_frac", "zero_frac")
    ]
    assert matched(head["activations: saturated fraction"]) == ["gradwatch/activations/head/saturated_frac"]
    # findings and actions are text at their steps
    text = {
        tag: [(e.step, e.tensor_proto.string_val[0]) for e in acc.Tensors(tag)]
        for tag in ("gradwatch/findings/text_summary", "gradwatch/actions/text_summary")
    }
    assert [s for s, _ in text["gradwatch/findings/text_summary"]] == [3, 5]
    ((step, body),) = text["gradwatch/actions/text_summary"]
    assert step == 3 and b"skip_step" in body and b"nonfinite" in body


def test_block_charts_only_with_per_layer(tmp_path, loaders):
    mon = gradwatch.HealthMonitor(every_n_steps=5)
    t = trainer(tmp_path, [mon], max_steps=5)
    t.fit(DigitsMLP(), loaders[0])
    config = _acc(t.logger.log_dir).Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    titles = [c.title for c in layout_pb2.Layout.FromString(config).category]
    assert titles == ["gradwatch", "gradwatch activations"]
