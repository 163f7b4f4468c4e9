"""``repeated_batch``: the model is shown the same batch over and over, or one sample many times a batch."""

from __future__ import annotations

from gradwatch.detectors.base import Detector
from gradwatch.findings import Finding, Severity
from gradwatch.stats import BatchStats, Stats


class RepeatedBatch(Detector):
    """The batch fingerprint (``gradwatch/probes/fingerprint.py``: per tensor of the batch, its element
    count, sum, sum of squares and sum of squared per-sample sums, sample order left out) is exactly the
    same at two consecutive reads taken at different places of the data: the pipeline repeats one batch
    (a ``next(iter(loader))`` inside the loop over an unshuffled loader, a cached batch, a dataset whose
    ``__getitem__`` ignores its index). Or the samples of a floating tensor of the batch (8 of them,
    evenly spaced) are bit-identical to the first on two consecutive reads while the batch changes between
    them: the loader hands out one sample ``B`` times (workers or environments seeded alike, an ``expand``
    in ``collate_fn``).

    Epochs: an unshuffled loader gives the same batch at the same position of every epoch, and when the
    read interval is a multiple of the epoch length every read sees it (full-batch training, one batch an
    epoch, is the extreme). Two reads are at different places when they are in the same epoch (fewer steps
    apart than an epoch), or in different epochs at different positions within them (the epoch starts are
    taken from the per-step records; without every step's record, as with ``measure="scheduled"``, reads in
    different epochs are not compared). Where the loop does not say where its epochs start (a ``Watch``
    loop without ``epoch=``), a batch the same since the first read may be full-batch training: that is an
    ``info`` finding, and only a batch that changed and then stopped changing is a warning.

    Threshold: exact equality of the moments (two different batches agree on all of them by chance with
    a probability below 1e-6; the same samples give bit-identical moments), once; the identical-samples
    test on two reads in a row. Severity: warning. Evidence: the step of the earlier read, the batch's first
    tensor's elements and sum. Sources: "overfit one batch" done by accident (A. Karpathy, "A Recipe for
    Training Neural Networks", 2019); PyTorch's FAQ "My data loader workers return identical random
    numbers" (docs/notes/faq.rst).
    """

    rule = "repeated_batch"
    assumes = (
        "The batch's tensors are the data the step trains on; distinct batches differ in some moment; an epoch "
        "(where the loop says where epochs start) visits each position of the data once."
    )
    state_fields = ("last", "epoch", "epoch_start", "last_row", "varied", "same_reads")
    advice = (
        "The model is trained on the same data again and again: check the data pipeline. A batch drawn with "
        "next(iter(loader)) inside the loop restarts an unshuffled loader every step; a cached or reused "
        "batch variable, or a Dataset whose __getitem__ ignores its index, repeats too. If every sample of "
        "a batch is the same, the loader or collate_fn repeats one sample (workers or environments seeded "
        "alike). Full-batch training on purpose in a Watch loop: pass epoch= to watch.step (each step an "
        "epoch) and gradwatch will not count the repeats."
    )

    def __init__(self) -> None:
        self.last: list | None = None  # [step, epoch, position or None, moments] of the previous read
        self.epoch = -1  # the epoch of the newest per-step record, and the step it started at (if seen)
        self.epoch_start: int | None = None
        self.last_row = -2  # the newest per-step record's step
        self.varied = False  # the fingerprint changed between two reads at least once
        self.same_reads = 0  # consecutive reads whose samples were all identical

    def check(self, step: int, stats: Stats) -> list[Finding]:
        for rec in stats.steps:  # where the current epoch started, if its first step was recorded
            if rec.epoch != self.epoch:
                contiguous = rec.step == self.last_row + 1 or (rec.step == 0 and rec.epoch == 0)
                self.epoch, self.epoch_start = rec.epoch, rec.step if contiguous else None
            self.last_row = rec.step
        batch = stats.batch
        if batch is None:
            return []
        here = stats.epoch == self.epoch and self.epoch_start is not None
        position = step - self.epoch_start if here else None
        out = self._samples(step, stats, batch)
        last, moments = self.last, [list(m) for m in batch.moments]
        self.last = [step, stats.epoch, position, moments]
        if last is None or last[0] >= step:
            return out
        if moments != last[3]:
            self.varied = True
            return out + self.resolve("repeat", step, stats.epoch, None, "the batch changes again")
        elsewhere = last[1] == stats.epoch or (
            last[2] is not None and position is not None and last[2] != position
        )
        if not elsewhere:  # the same place of another epoch: an unshuffled loader, or one batch an epoch
            return out
        numel, total = moments[0][0], moments[0][1]
        evidence = {"step_before": float(last[0]), "elements": numel, "sum": total}
        seen = f"the same batch at steps {last[0]} and {step} ({numel:.0f} elements, sum {total:.6g})"
        if not batch.epochs_counted and not self.varied:  # Watch without epoch=: full-batch training?
            message = (
                f"{seen}, as at every read so far: full-batch training, or a pipeline that repeats one batch"
            )
            return out + self.report(
                "unchanged", self.finding(Severity.INFO, step, stats.epoch, None, message, evidence)
            )
        message = f"{seen}: the data pipeline repeats one batch"
        return out + self.report(
            "repeat", self.finding(Severity.WARNING, step, stats.epoch, None, message, evidence)
        )

    def _samples(self, step: int, stats: Stats, batch: BatchStats) -> list[Finding]:
        """Every sample of the batch's largest tensor (the input) identical to the first, on two reads in a
        row, while the batch changed between them (a constant input, the same at every read, is left
        alone)."""
        # the largest tensor is the input; a small one with one value per batch (a constant weight, float
        # targets mostly 0) is identical across samples by nature
        largest = max(range(len(batch.moments)), key=lambda i: batch.moments[i][0], default=None)
        slot = largest if largest is not None and batch.identical[largest] else None
        changed = self.last is not None and self.last[3] != [list(m) for m in batch.moments]
        if slot is None:
            self.same_reads = 0
            return self.resolve("samples", step, stats.epoch, None, "the samples of a batch differ again")
        self.same_reads = self.same_reads + 1 if changed or self.same_reads == 0 else 0
        if self.same_reads < 2:
            return []
        numel = batch.moments[slot][0]
        message = (
            f"the samples of the batch's tensor {slot} are all the same (8 compared, {numel:.0f} elements) at "
            "two reads in a row, while the batch changes: the loader repeats one sample"
        )
        evidence = {"tensor": float(slot), "elements": numel}
        return self.report(
            "samples", self.finding(Severity.WARNING, step, stats.epoch, None, message, evidence)
        )
