"""``nonfinite``: NaN or Inf in the loss, the gradients or the weights."""

from __future__ import annotations

import math

from gradwatch.detectors.base import Detector
from gradwatch.findings import Finding, Severity
from gradwatch.probes.layout import layer_of
from gradwatch.stats import Stats

ADVICE_GRADS = (
    "A non-finite gradient poisons the weights and the optimizer's moments at the next step. Common "
    "causes: a learning rate too high for the model (lower it, or warm it up), log/exp/division on "
    "values that can reach 0 or overflow (add an epsilon, use log_softmax / BCEWithLogits), unnormalized "
    "inputs, or fp16 overflow (use bf16 or a GradScaler). Clip gradients and check the named layer first."
)
ADVICE_LOSS = (
    "The loss itself is not finite, so every gradient of this step is meaningless. Check the batch "
    "for NaN/Inf values and the loss for log(0), division by zero or overflow; lower the learning rate "
    "if the loss grew before it broke."
)
ADVICE_WEIGHTS = (
    "Weights are NaN/Inf: the model is corrupted and training cannot recover by itself. Restore the "
    "last good checkpoint, then lower the learning rate or clip gradients before resuming."
)


class NonFinite(Detector):
    """Fires on the first step of each episode of non-finite loss, gradients or weights.

    Statistic: ``isfinite`` of the training loss and of each parameter's gradient L2 norm (every step,
    on device), and of each layer's weight norm (scheduled steps). A norm is non-finite exactly when
    its tensor holds a NaN or an Inf.

    Threshold: any non-finite value. Severity: critical. Evidence: the loss, the total gradient norm,
    the number of parameters with non-finite gradients. Layer: the first parameter's module, in
    ``named_parameters`` order, whose gradient is non-finite (the earliest place to look), or the
    first layer with non-finite weights.

    One finding per episode: consecutive bad steps are one episode; a finite step ends it.
    """

    rule = "nonfinite"
    state_fields = ("grads_active", "weights_active")

    def __init__(self) -> None:
        self.grads_active = False
        self.weights_active = False

    def check(self, step: int, stats: Stats) -> list[Finding]:
        findings: list[Finding] = []
        for rec in stats.steps:
            loss_bad = rec.loss is not None and not math.isfinite(rec.loss)
            grads_bad = rec.grad_nonfinite > 0
            if not (loss_bad or grads_bad):
                self.grads_active = False
                continue
            if self.grads_active:
                continue
            self.grads_active = True
            evidence = {
                "loss": rec.loss if rec.loss is not None else math.nan,
                "grad_norm": rec.grad_norm,
                "nonfinite_params": float(rec.grad_nonfinite),
            }
            if rec.lr is not None:
                evidence["lr"] = rec.lr
            if grads_bad:
                what = (
                    f"the loss is {rec.loss:g} and "
                    if loss_bad
                    else f"the loss is finite ({rec.loss:.4g}) but "
                )
                if rec.loss is None:
                    what = ""
                message = (
                    f"{what}{rec.grad_nonfinite} parameter(s) have non-finite gradients "
                    f"(total grad norm {rec.grad_norm:g}); first: {rec.first_nonfinite}"
                )
            else:
                message = f"training loss is {rec.loss:g}"
            findings.append(
                Finding(
                    rule=self.rule,
                    severity=Severity.CRITICAL,
                    step=rec.step,
                    epoch=rec.epoch,
                    layer=layer_of(rec.first_nonfinite) if rec.first_nonfinite else None,
                    message=message,
                    evidence=evidence,
                    advice=ADVICE_LOSS if loss_bad else ADVICE_GRADS,
                )
            )
        bad_layers = [name for name, norm in stats.weight_norm.items() if not math.isfinite(norm)]
        if bad_layers and not self.weights_active:
            findings.append(
                Finding(
                    rule=self.rule,
                    severity=Severity.CRITICAL,
                    step=step,
                    epoch=stats.epoch,
                    layer=bad_layers[0],
                    message=f"weights of {len(bad_layers)} layer(s) are non-finite; first: {bad_layers[0]}",
                    evidence={"nonfinite_layers": float(len(bad_layers))},
                    advice=ADVICE_WEIGHTS,
                )
            )
        if stats.weight_norm:
            self.weights_active = bool(bad_layers)
        return findings
