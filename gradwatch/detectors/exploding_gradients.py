"""``exploding_gradients``: sustained growth of the gradient norm while the loss gets worse."""

from __future__ import annotations

import math

from gradwatch.detectors._running import EMA, safe_log
from gradwatch.detectors.base import Detector, check_count, check_threshold
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


class ExplodingGradients(Detector):
    """The gradient norm's trend rises by orders of magnitude and stays there.

    Formula: ``G`` = EMA (alpha 0.9) of ``log g``, ``G_min`` its minimum after ``warmup_steps``;
    ``L`` = EMA (alpha 0.9) of the loss, ``L_best`` its minimum. Fires when, for ``patience``
    consecutive steps, ``exp(G - G_min) >= growth`` (10x) and the loss is getting worse, or
    ``exp(G - G_min) >= 100 * growth`` whatever the loss does. *Worse*: ``L >= 1.2 * L_best`` for a
    positive loss that is minimized; for a signed one (``loss="signed"``, or once ``L_best <= 0``: a ratio
    means nothing below zero) ``L - L_best >= 0.2 * (L_0 - L_best)``, a fifth of the progress lost
    (``L_0``: ``L`` after the warm-up); with ``loss="surrogate"`` never (only the 1000x rule fires).
    A healthy run's gradient norm can grow 10x as it learns; with the loss falling that is not an
    explosion. Non-finite steps are the ``nonfinite`` rule's and are skipped here.

    Severity: warning; critical at 1000x. Evidence: grad_norm, grad_norm_min, growth, loss, loss_best.
    """

    rule = "exploding_gradients"
    assumes = (
        "On a healthy run the gradient norm's trend settles after warm-up. A 10x rise counts only while the "
        "loss gets worse, judged by the declared loss kind (a ratio for a positive minimized loss, the share "
        "of progress lost for a signed one, never for a surrogate); 1000x counts whatever the loss does. "
        "Norms that grow by design while the loss falls (a Gaussian NLL whose variance shrinks) are healthy."
    )
    state_fields = ("g", "loss", "g_min", "loss_best", "streak", "loss_initial")
    advice = (
        "Gradients have been growing by orders of magnitude while the loss gets worse: the learning rate "
        "is too high for the current curvature, or the model is unstable (deep plain stacks, recurrent "
        "weights > 1, no normalization). Lower the learning rate (or add warm-up), clip gradients, add "
        "normalization layers (BatchNorm/LayerNorm), and prefer architectures with skip connections."
    )

    def __init__(self, growth: float = 10.0, patience: int = 5, warmup_steps: int = 10) -> None:
        self.growth = check_threshold("ExplodingGradients", "growth", growth, low=1.0, example=10.0)
        self.patience = check_count("ExplodingGradients", "patience", patience, example=5)
        self.warmup_steps = int(
            check_threshold("ExplodingGradients", "warmup_steps", warmup_steps, low=-1, example=10)
        )
        self.g, self.loss = EMA(0.9), EMA(0.9)
        self.g_min = math.inf
        self.loss_best = math.inf
        self.loss_initial = math.nan
        self.streak = 0

    def _worse(self) -> bool:
        """Whether the loss's trend is getting worse (see the class docstring)."""
        L, best = self.loss.mean, self.loss_best
        if self.loss.n == 0 or best == math.inf or self.loss_kind == "surrogate":
            return False
        if self.loss_kind == "minimize" and best > 0:
            return L >= 1.2 * best
        return self.loss_initial > best and L - best >= 0.2 * (self.loss_initial - best)

    def check(self, step: int, stats: Stats) -> list[Finding]:
        out: list[Finding] = []
        for rec in stats.steps:
            if rec.grad_nonfinite or not math.isfinite(rec.grad_norm) or rec.grad_norm <= 0:
                continue
            self.g.update(safe_log(rec.grad_norm))
            if rec.loss is not None and math.isfinite(rec.loss):
                self.loss.update(rec.loss)
            if self.g.n <= self.warmup_steps:
                continue
            self.g_min = min(self.g_min, self.g.mean)
            self.loss_best = min(self.loss_best, self.loss.mean) if self.loss.n else self.loss_best
            if math.isnan(self.loss_initial) and self.loss.n:
                self.loss_initial = self.loss.mean
            growth = math.exp(self.g.mean - self.g_min)
            worse = self._worse()
            if (growth >= self.growth and worse) or growth >= 100 * self.growth:
                self.streak += 1
            else:
                self.streak = 0
                if growth < math.sqrt(self.growth) and "explode" in self.active:
                    out += self.resolve(
                        "explode",
                        rec.step,
                        rec.epoch,
                        None,
                        f"gradient norm back to {growth:.1f}x its minimum",
                        {"growth": growth},
                    )
            if self.streak >= self.patience:
                severity = Severity.CRITICAL if growth >= 100 * self.growth else Severity.WARNING
                evidence = {
                    "grad_norm": math.exp(self.g.mean),
                    "grad_norm_min": math.exp(self.g_min),
                    "growth": growth,
                    "loss": self.loss.mean,
                    "loss_best": self.loss_best,
                }
                loss = (  # say what the loss did: a 1000x growth fires whatever it does
                    f"while the loss rose to {self.loss.mean:.4g} (best {self.loss_best:.4g})"
                    if self._worse()
                    else f"(the loss is {self.loss.mean:.4g}, best {self.loss_best:.4g})"
                )
                message = (
                    f"gradient norm trend grew {growth:.3g}x (from {evidence['grad_norm_min']:.3g} to "
                    f"{evidence['grad_norm']:.3g}) over the run {loss}"
                )
                out += self.report(
                    "explode", self.finding(severity, rec.step, rec.epoch, None, message, evidence)
                )
        return out
