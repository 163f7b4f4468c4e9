"""``divergence``: the training loss trends up, far above its best, by more than its own noise."""

from __future__ import annotations

import math
import statistics

from gradwatch.detectors.base import Detector, check_count, check_threshold
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats

#: ``loss=`` kinds (see gradwatch/config.py): how the loss-trend rules read the training loss.
LOSS_KINDS = ("minimize", "signed", "surrogate")


def median_noise(values: list[float]) -> float:
    """The standard error of the median of ``values``: ``1.2533 * 1.4826 * MAD / sqrt(n)`` (the MAD is
    robust to the spikes the median ignores; 1.4826 makes it a standard deviation for Gaussian noise,
    1.2533 is the median's efficiency).

    Example:
        >>> round(median_noise([1.0, 2.0, 3.0, 4.0]), 3)
        0.929
    """
    m = statistics.median(values)
    mad = statistics.median(abs(v - m) for v in values)
    return 1.2533 * 1.4826 * mad / math.sqrt(len(values))


class Divergence(Detector):
    """The running median of the training loss has risen well above the best it reached, and stays there.

    Formula: ``M`` = median of the last ``window`` (20) losses — a median, so one spiky batch does
    not move it; ``M_best`` its minimum; ``M_0`` its first value; ``s`` the standard error of ``M``
    in the best window (:func:`median_noise`: the loss's healthy noise; a diverging loss's own spread
    would hide its rise). A step is *rising* when ``M - M_best >= noise_z * s`` (4: a rise the loss's
    own noise does not explain: small noisy batches) **and**

    - for a loss that is minimized (``loss="minimize"``, the default, while ``M_best >= 0``):
      ``M >= factor * M_best`` (2x, MosaicML's rule) and ``M - M_best >= 0.1 * M_0`` (a loss that
      doubles from 0.01 to 0.02 near convergence is not called divergence);
    - for a signed loss (``loss="signed"``, or any loss once ``M_best < 0``: a negative log-likelihood),
      where ratios mean nothing: ``M - M_best >= 0.5 * (M_0 - M_best)``, half the progress made is lost.

    Fires after ``patience`` (5) rising steps in a row; critical when ``M`` is back at or above ``M_0``.
    With ``loss="surrogate"`` (policy gradients, GAN losses: not a progress measure) it is not run.

    Evidence: loss (the median), loss_best, loss_initial, ratio (where ratios are used), noise
    (``s``), grad_ratio: the median gradient norm of the window over its median at the best loss,
    best_step and best_from_step (the last and first steps of the best window). A loss rise alone never
    moves a remedy: rollback and reduce_lr act on a divergence only with gradient evidence,
    ``grad_ratio`` or a gradient rule's warning since ``best_from_step``
    (gradwatch/remedies/responder.py, ``trend_only``).
    """

    rule = "divergence"
    assumes = (
        "The loss is a progress measure: lower is better (`minimize`: ratios to the best are meaningful while "
        "it stays >= 0; `signed`: it may be negative, judged by the share of progress lost), and its noise at "
        "its best window is the scale a real rise must exceed. Not run on a surrogate loss (policy gradients, "
        "GANs). A rise alone moves no remedy."
    )
    loss_kinds = ("minimize", "signed")
    state_fields = ("recent", "best", "initial", "streak", "grads", "grad_best", "best_step", "noise")
    advice = (
        "The loss has been climbing away from the best it reached: the learning rate is too high at this "
        "point of training (a schedule that rises too far, warm-up too short), or the optimizer state is "
        "corrupted by earlier spikes. Lower the learning rate, add warm-up or decay, clip gradients, and "
        "roll back to the best checkpoint rather than training on."
    )

    def __init__(
        self, factor: float = 2.0, patience: int = 5, window: int = 20, noise_z: float = 4.0
    ) -> None:
        self.factor = check_threshold("Divergence", "factor", factor, low=1.0, example=2.0)
        self.patience = check_count("Divergence", "patience", patience, example=5)
        self.window = check_count("Divergence", "window", window, low=2, example=20)
        self.noise_z = check_threshold("Divergence", "noise_z", noise_z, low=-1e-12, example=4.0)
        self.recent: list[float] = []
        self.best = math.inf
        self.initial = math.nan
        self.streak = 0
        self.grads: list[float] = []
        self.grad_best = math.nan
        self.best_step = -1
        self.noise = math.nan  # the median's standard error at the best window: the loss's healthy noise

    def _rising(self, m: float, noise: float) -> bool:
        best, initial = self.best, self.initial
        if not m - best >= self.noise_z * noise or not m > best:
            return False
        if self._ratios():
            return m >= self.factor * best and m - best >= 0.1 * abs(initial)
        return initial > best and m - best >= 0.5 * (initial - best)

    def _ratios(self) -> bool:
        """Whether ratios to the best loss mean something: a minimized loss that never went below zero."""
        return self.loss_kind == "minimize" and self.best >= 0

    def _recovered(self, m: float) -> bool:
        best = self.best
        if self._ratios():
            return m < best + 0.5 * (self.factor - 1) * best
        return m < best + 0.25 * max(self.initial - best, 0.0)

    def check(self, step: int, stats: Stats) -> list[Finding]:
        out: list[Finding] = []
        for rec in stats.steps:
            if rec.loss is None or not math.isfinite(rec.loss):
                continue
            self.recent, self.grads = list(self.recent), list(self.grads)  # a checkpoint may hold tuples
            recent, grads = self.recent, self.grads
            recent.append(rec.loss)
            if math.isfinite(rec.grad_norm):
                grads.append(rec.grad_norm)
            del grads[: max(len(grads) - self.window, 0)]
            if len(recent) > self.window:
                del recent[: len(recent) - self.window]  # a resumed run may have a smaller window
            elif len(recent) < self.window:
                continue
            m = statistics.median(recent)
            g = statistics.median(grads) if grads else math.nan
            if math.isnan(self.initial):
                self.initial = m
            if m < self.best:
                self.best, self.grad_best, self.best_step = m, g, rec.step
                self.noise = median_noise(recent)
            if math.isnan(self.noise):  # a state saved before the noise was kept: measure it now
                self.noise = median_noise(recent)
            rising = self._rising(m, self.noise)
            self.streak = self.streak + 1 if rising else 0
            if not rising and "diverge" in self.active and self._recovered(m):
                out += self.resolve(
                    "diverge", rec.step, rec.epoch, None, f"loss back to {m:.4g} (best {self.best:.4g})"
                )
            if self.streak >= self.patience:
                out += self._report(rec, m, g)
        return out

    def _report(self, rec, m: float, g: float) -> list[Finding]:  # noqa: ANN001 - a StepRecord
        best, initial = self.best, self.initial
        severity = Severity.CRITICAL if m >= initial else Severity.WARNING
        grad_ratio = g / self.grad_best if self.grad_best > 0 else math.nan
        evidence = {
            "loss": m,
            "loss_best": best,
            "loss_initial": initial,
            "noise": self.noise,
            "grad_ratio": grad_ratio,
            "best_step": float(self.best_step),  # the last step of the window whose median was the best
            "best_from_step": float(self.best_step - self.window + 1),
        }
        if self._ratios():
            evidence["ratio"] = m / best if best > 0 else math.inf
            how = f"{evidence['ratio']:.2f}x its best {best:.4g}"
        else:
            how = f"{m - best:.4g} above its best {best:.4g}"
        message = (
            f"median training loss of the last {self.window} steps rose to {m:.4g}, {how} (initial "
            f"{initial:.4g}, noise {evidence['noise']:.2g})"
        )
        if math.isfinite(grad_ratio):
            message += f"; gradient norms {grad_ratio:.2f}x their level at the best loss"
        return self.report("diverge", self.finding(severity, rec.step, rec.epoch, None, message, evidence))
