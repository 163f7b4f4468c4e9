"""What gradwatch writes: TensorBoard through the trainer's loggers, the events file, logging."""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import pytorch_lightning as pl
from models import DigitsMLP, trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradwatch
from gradwatch.findings import REMEDIES, RULES
from gradwatch.sinks import read_events

FINDING_FIELDS = {
    "kind",
    "time",
    "rule",
    "severity",
    "step",
    "epoch",
    "layer",
    "message",
    "evidence",
    "advice",
}


def _strict(line: str) -> dict:
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def _tb(logdir: str) -> EventAccumulator:
    files = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    assert len(files) == 1, f"expected the logger's one event file, found {files}"  # no second writer
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_has_gradwatch_tags_text_and_layout(tmp_path, loaders):
    mon = gradwatch.HealthMonitor(every_n_steps=5, per_layer=True, remedies="off")
    t = trainer(tmp_path, [mon], max_steps=20, val_check_interval=10)
    t.fit(DigitsMLP(nan_at_step=12), *loaders)
    acc = _tb(t.logger.log_dir)
    scalars = set(acc.Tags()["scalars"])
    for tag in [
        "gradwatch/loss/train",
        "gradwatch/loss/val",
        "gradwatch/grad_norm/total",
        "gradwatch/weight_norm/total",
        "gradwatch/update_ratio/total",
        "gradwatch/lr",
        "gradwatch/inputs/std",
        "gradwatch/activations/max_dead_unit_frac",
        "gradwatch/grad_norm/net.0",  # per layer = per module: weight and bias together
        "gradwatch/update_ratio/head",
        "gradwatch/activations/net.1/zero_frac",
    ]:
        assert tag in scalars, tag
    assert not any(t.endswith((".weight", ".bias")) for t in scalars), "no tag per parameter"
    # per-step rows at the trainer's log_every_n_steps (5 here) and at every notable step: from the
    # NaN at step 12 on, every step (non-finite values), not just the scheduled reads
    assert [e.step for e in acc.Scalars("gradwatch/grad_norm/total")] == [4, 9, *range(12, 20)]
    assert [e.step for e in acc.Scalars("gradwatch/weight_norm/total")] == [0, 5, 10, 15]
    tensors = set(acc.Tags()["tensors"])
    assert "gradwatch/findings/text_summary" in tensors
    finding_text = acc.Tensors("gradwatch/findings/text_summary")[0]
    assert finding_text.step == 12 and b"nonfinite" in finding_text.tensor_proto.string_val[0]
    assert "custom_scalars__config__" in tensors


@pytest.mark.parametrize(
    ("every", "max_steps", "steps"),
    [(1, 23, list(range(23))), (10, 23, [9, 19, 22]), (10, 21, [9, 19, 20])],  # 20: a read's own step
)
def test_step_rows_follow_the_trainers_log_every_n_steps(tmp_path, loaders, every, max_steps, steps):
    """A healthy run: the loss and gradient norm rows come at Lightning's logging cadence, and the
    run's last step closes the curve; every_n_steps (the reads) does not change it."""
    mon = gradwatch.HealthMonitor(every_n_steps=4, remedies="off")
    t = trainer(tmp_path, [mon], max_steps=max_steps, log_every_n_steps=every)
    t.fit(DigitsMLP(), loaders[0])
    acc = _tb(t.logger.log_dir)
    for tag in ("gradwatch/grad_norm/total", "gradwatch/loss/train", "gradwatch/lr"):
        assert [e.step for e in acc.Scalars(tag)] == steps, tag
    assert mon.monitor.steps_seen == max_steps and not mon.findings  # every step was still judged


@pytest.mark.parametrize(("every", "steps"), [(1, [0, 4, 8, 12, 16, 20]), (10, [0, 12, 20]), (50, [0, 20])])
def test_read_rows_follow_the_logging_cadence_between_probes(tmp_path, loaders, every, steps):
    """The read's own row (weight norms) is written at the first read, then by the first read after a
    step of the logging cadence (steps 9 and 19 with log_every_n_steps=10), as the per-step rows are; the
    last read's row closes the curve at the end (step 20 with a cadence longer than the run). Reads with
    heavy-probe results always write it (none here: the probes are off)."""
    mon = gradwatch.HealthMonitor(
        every_n_steps=4, remedies="off", activations=False, inputs=False, update_ratio=False
    )
    t = trainer(tmp_path, [mon], max_steps=23, log_every_n_steps=every)
    t.fit(DigitsMLP(), loaders[0])
    assert [e.step for e in _tb(t.logger.log_dir).Scalars("gradwatch/weight_norm/total")] == steps


def test_read_row_after_a_cadence_step_read_by_an_early_stopping_flush(tmp_path, loaders):
    """Validation flushes what is pending for early stopping; when that flush holds the cadence step
    (step 22 of a 23-batch epoch with log_every_n_steps=23) it has no weight norms, and the next scheduled
    read (step 25) writes them. (Step 45 is a scheduled read itself, before that validation.)"""
    mon = gradwatch.HealthMonitor(
        every_n_steps=5,
        per_layer=True,
        remedies=["early_stop"],
        activations=False,
        inputs=False,
        update_ratio=False,
    )
    t = trainer(tmp_path, [mon], max_epochs=3, log_every_n_steps=len(loaders[0]))
    t.fit(DigitsMLP(), *loaders)
    n = len(loaders[0])
    acc = _tb(t.logger.log_dir)
    for tag in ("gradwatch/weight_norm/total", "gradwatch/grad_norm/net.0"):
        steps = [e.step for e in acc.Scalars(tag)]
        for epoch_end in (n - 1, 2 * n - 1):
            first_read = -(-epoch_end // 5) * 5  # the scheduled read at or after the cadence step
            assert first_read in steps, (tag, steps)


def test_totals_only_by_default(tmp_path, loaders):
    mon = gradwatch.HealthMonitor(every_n_steps=5)
    t = trainer(tmp_path, [mon], max_steps=10)
    t.fit(DigitsMLP(), loaders[0])
    scalars = set(_tb(t.logger.log_dir).Tags()["scalars"])
    gw = {s for s in scalars if s.startswith("gradwatch/")}
    assert "gradwatch/grad_norm/total" in gw and "gradwatch/grad_norm/net.0" not in gw
    assert len(gw) < 20


def test_csv_logger_gets_the_scalars(tmp_path, loaders):
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    mon = gradwatch.HealthMonitor(every_n_steps=5)
    trainer(tmp_path, [mon], logger=logger, max_steps=10).fit(DigitsMLP(), loaders[0])
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        header = next(csv.reader(f))
    assert "gradwatch/grad_norm/total" in header and "gradwatch/loss/train" in header
    assert mon.events_path == os.path.join(logger.log_dir, "gradwatch", "events.jsonl")


def test_no_logger_still_writes_events(tmp_path, loaders):
    mon = gradwatch.HealthMonitor(every_n_steps=5)
    trainer(tmp_path, [mon], logger=False, max_steps=10).fit(DigitsMLP(nan_at_step=2), loaders[0])
    path = tmp_path / "gradwatch" / "events.jsonl"
    assert mon.events_path == str(path)
    kinds = [e["kind"] for e in read_events(path)]
    assert kinds[0] == "finding" and kinds[-1] == "summary"


def test_events_file_is_strict_jsonl_with_contract_fields(tmp_path, loaders):
    path = tmp_path / "custom" / "ev.jsonl"
    mon = gradwatch.HealthMonitor(every_n_steps=5, events_path=path, remedies="off")
    trainer(tmp_path, [mon], max_steps=15).fit(DigitsMLP(nan_at_step=4), *loaders)
    lines = path.read_text().splitlines()
    events = [_strict(line) for line in lines]
    assert all(e["kind"] in {"finding", "action", "summary"} for e in events)
    findings = [e for e in events if e["kind"] == "finding"]
    assert findings and all(set(e) == FINDING_FIELDS for e in findings)
    assert all(e["rule"] in RULES and e["severity"] in {"info", "warning", "critical"} for e in findings)
    first = findings[0]
    assert (first["step"], first["layer"], first["evidence"]["loss"]) == (4, "net.0", "nan")
    summary = events[-1]
    assert (
        summary["kind"] == "summary" and summary["status"] == "finished" and summary["verdict"] == "critical"
    )
    assert summary["rules"][0] == {
        "rule": "nonfinite",
        "severity": "critical",
        "first_step": 4,
        "count": 2,
        "layer": "net.0",
    }
    assert all(a["remedy"] in REMEDIES for e in events if e["kind"] == "action" for a in [e])
    # the findings in memory are the ones on disk
    assert [f.to_dict()["step"] for f in mon.findings] == [e["step"] for e in findings]


def test_findings_go_to_python_logging(tmp_path, loaders, caplog):
    logger = logging.getLogger("gradwatch")
    logger.addHandler(caplog.handler)
    try:
        mon = gradwatch.HealthMonitor(every_n_steps=5)
        trainer(tmp_path, [mon], max_steps=10, logger=False).fit(DigitsMLP(nan_at_step=3), loaders[0])
    finally:
        logger.removeHandler(caplog.handler)
    errors = [r for r in caplog.records if r.name == "gradwatch" and r.levelno == logging.ERROR]
    assert errors and "nonfinite at step 3 in net.0" in errors[0].getMessage()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith("gradwatch health summary: CRITICAL") and "nonfinite" in m for m in infos)


def test_killed_run_keeps_events_written_before(tmp_path):
    """SIGKILL mid-fit: the finding written at step 5 is on disk, whole."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import pytorch_lightning as pl, gradwatch
        from models import DigitsMLP, digits_loaders, trainer

        class Kill(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == 8:
                    os.kill(os.getpid(), signal.SIGKILL)

        mon = gradwatch.HealthMonitor(every_n_steps=5, events_path={str(tmp_path / "ev.jsonl")!r})
        trainer({str(tmp_path)!r}, [mon, Kill()], max_steps=20, logger=False).fit(
            DigitsMLP(nan_at_step=2), digits_loaders()[0])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    events = [_strict(line) for line in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["rule"], e["step"]) for e in events][:1] == [("finding", "nonfinite", 2)]
    assert all(e["kind"] != "summary" for e in events)


def test_failed_run_writes_a_failed_summary(tmp_path, loaders):
    class Boom(DigitsMLP):
        def training_step(self, batch, batch_idx):
            if self.global_step == 6:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    mon = gradwatch.HealthMonitor(every_n_steps=5)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [mon], max_steps=10, logger=False).fit(Boom(), loaders[0])
    (summary,) = [e for e in read_events(mon.events_path) if e["kind"] == "summary"]
    assert summary["status"] == "failed"


def test_one_event_per_step_matches_log_metrics(tmp_path):
    """The TensorBoard sink writes a step's scalars as one event; read back, it is what log_metrics writes."""
    import math

    from gradwatch.sinks.tensorboard import TensorBoard, scalar_writer

    fast = pl.loggers.TensorBoardLogger(str(tmp_path), name="fast")
    ref = pl.loggers.TensorBoardLogger(str(tmp_path), name="ref")
    assert scalar_writer(fast) is not None  # pins the private access (SummaryWriter._get_file_writer)
    assert scalar_writer(pl.loggers.TensorBoardLogger(str(tmp_path), name="p", prefix="p")) is None
    assert scalar_writer(pl.loggers.CSVLogger(str(tmp_path))) is None
    sink = TensorBoard([fast])
    rows = [
        (0, {"gradwatch/loss/train": 2.302585, "gradwatch/grad_norm/total": 1.5, "gradwatch/lr": 0.1}),
        (1, {"gradwatch/loss/train": 1.9, "gradwatch/grad_norm/total": math.inf, "gradwatch/lr": 0.1}),
        (2, {"gradwatch/loss/train": math.nan, "gradwatch/grad_norm/total": 1e30, "gradwatch/lr": 0.05}),
        (2, {"gradwatch/weight_norm/total": 12.25}),  # a second write at the same step
    ]
    for step, values in rows:
        sink.scalars(step, values)
        ref.log_metrics(values, step=step)
    fast.experiment.flush()
    ref.experiment.flush()
    a, b = _tb(fast.log_dir), _tb(ref.log_dir)
    assert sorted(a.Tags()["scalars"]) == sorted(b.Tags()["scalars"])
    for tag in b.Tags()["scalars"]:
        got = [(e.step, e.value) for e in a.Scalars(tag)]
        want = [(e.step, e.value) for e in b.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert all(
            x == y or (math.isnan(x) and math.isnan(y)) for (_, x), (_, y) in zip(got, want, strict=True)
        ), tag


def test_a_sink_that_fails_is_turned_off_and_training_goes_on(tmp_path, loaders, caplog):
    """An events file that cannot be written (``/dev/full``: every write fails with ENOSPC) is logged once
    and turned off; the fit finishes, the other sinks (TensorBoard) keep writing, findings are kept."""
    mon = gradwatch.HealthMonitor(every_n_steps=5, events_path="/dev/full", print_summary=False)
    t = trainer(tmp_path, [mon], max_steps=20)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        t.fit(DigitsMLP(nan_at_step=3), loaders[0])
    assert t.state.finished and t.global_step == 20
    assert any(f.rule == "nonfinite" for f in mon.findings)
    failed = [r.getMessage() for r in caplog.records if "sink failed" in r.getMessage()]
    assert len(failed) == 1 and "the events sink failed" in failed[0], failed
    tags = EventAccumulator(t.logger.log_dir).Reload().Tags()["scalars"]
    assert "gradwatch/grad_norm/total" in tags


def test_a_custom_sink_gets_the_rows_at_the_logging_cadence():
    """A Sink handed to the core (gradwatch.Monitor in a plain loop) gets every step's row through its
    ``scalars`` at ``log_every_n_steps``, the read's own row, the validation loss, and the curves closed
    at the end: the cadence lives in the fan-out, not in the TensorBoard sink."""
    import torch

    from gradwatch.sinks import Sink

    class Rows(Sink):
        name = "rows"

        def __init__(self):
            self.rows: dict[int, dict[str, float]] = {}

        def scalars(self, step, values):
            self.rows.setdefault(step, {}).update(values)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Rows()
    mon = gradwatch.Monitor(every_n_steps=5, remedies="off")
    mon.bind(model, [sink], meta={"log_every_n_steps": 2})
    for step in range(11):
        x = torch.randn(16, 4)
        mon.batch_start(step, (x,))
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        mon.before_optimizer_step(step, 0, list(model.parameters()), 0.1)
        opt.step()
        mon.batch_end(loss)
    mon.validation_end(10, 0.5)
    mon.finish()
    steps = sorted(s for s, r in sink.rows.items() if "gradwatch/grad_norm/total" in r)
    assert steps == [1, 3, 5, 7, 9, 10]  # every second step, and the last one closing the curve
    assert "gradwatch/weight_norm/total" in sink.rows[0] and sink.rows[10]["gradwatch/loss/val"] == 0.5
