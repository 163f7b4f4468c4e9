"""``nonfinite``: NaN or Inf in the loss, the gradients or the weights."""

from __future__ import annotations

import math

from gradwatch.detectors.base import Detector
from gradwatch.errors import ConfigError
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
ADVICE_SCALER_SKIP = (
    "With fp16 mixed precision the GradScaler skips a step whose scaled gradients overflow and halves the "
    "loss scale; a few skips, mostly early while the scale calibrates, are normal and need no action. "
    "gradwatch counts them and does not report them as non-finite gradients."
)
ADVICE_SCALE_COLLAPSE = (
    "The loss scale keeps falling: the gradients overflow even after the scaler lowered the scale many "
    "times, so steps are being skipped and the model is not learning. Something produces Inf/NaN "
    "regardless of scale: check the loss for log(0)/division, lower the learning rate, keep the "
    "loss/softmax in fp32, or switch to bf16-mixed (no scaler needed)."
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

    fp16 with a GradScaler: a step the scaler skipped (it found an Inf/NaN gradient and lowered the
    scale; ``StepRecord.scaler_skipped``) is the scaler doing its job, not a fault: it is counted
    (``scaler_skips``), reported once as ``info``, and neither starts nor ends an episode -- unless the
    loss itself is non-finite, which no scale fixes. The scaler failing *is* a fault: a loss scale
    below ``min_loss_scale`` (critical) or ``max_consecutive_skips`` skipped steps in a row (warning).

    Args:
        min_loss_scale: a loss scale below this is a collapse (critical). GradScaler starts at 65536.
        max_consecutive_skips: this many scaler-skipped steps in a row is a warning (each halves the scale).

    Raises:
        ConfigError: on a non-positive or non-numeric argument.
    """

    rule = "nonfinite"
    assumes = (
        "Any NaN or Inf in the loss, a gradient or a weight is a fault, whatever the program, except the "
        "steps an fp16 GradScaler skips on purpose (its calibration: `info`)."
    )
    #: The advice for non-finite gradients; a non-finite loss, weights or loss scale get their own
    #: (``ADVICE_LOSS``, ``ADVICE_WEIGHTS``, ``ADVICE_SCALE_COLLAPSE``), chosen per finding.
    advice = ADVICE_GRADS
    state_fields = (
        "grads_active",
        "weights_active",
        "scaler_skips",
        "skip_streak",
        "skip_reported",
        "scale_active",
    )

    def __init__(self, min_loss_scale: float = 1.0, max_consecutive_skips: int = 10) -> None:
        if (
            isinstance(min_loss_scale, bool)
            or not isinstance(min_loss_scale, int | float)
            or min_loss_scale <= 0
        ):
            raise ConfigError(
                f"NonFinite(min_loss_scale=...) must be a positive number, got {min_loss_scale!r}. "
                "Write e.g. min_loss_scale=1.0."
            )
        if (
            isinstance(max_consecutive_skips, bool)
            or not isinstance(max_consecutive_skips, int)
            or max_consecutive_skips <= 0
        ):
            raise ConfigError(
                f"NonFinite(max_consecutive_skips=...) must be a positive int, got {max_consecutive_skips!r}. "
                "Write e.g. max_consecutive_skips=10."
            )
        self.min_loss_scale = float(min_loss_scale)
        self.max_consecutive_skips = max_consecutive_skips
        self.grads_active = False
        self.weights_active = False
        self.scaler_skips = 0  # steps the GradScaler skipped, over the run
        self.skip_streak = 0  # consecutive skipped steps up to the last one judged
        self.skip_reported = False  # the one info finding about skips was written
        self.scale_active = False  # a loss-scale collapse episode is open

    def _scaler(self, rec) -> list[Finding]:  # noqa: ANN001 - StepRecord
        """A scaler-skipped step with a finite loss: count it; report the first, and a collapse."""
        self.scaler_skips += 1
        self.skip_streak += 1
        out: list[Finding] = []
        scale = rec.loss_scale if rec.loss_scale is not None else math.nan
        evidence = {
            "loss_scale": scale,
            "scaler_skips": float(self.scaler_skips),
            "consecutive_skips": float(self.skip_streak),
            "nonfinite_params": float(rec.grad_nonfinite),
        }
        if not self.skip_reported:
            self.skip_reported = True
            out.append(
                Finding(
                    rule=self.rule,
                    severity=Severity.INFO,
                    step=rec.step,
                    epoch=rec.epoch,
                    layer=None,
                    message=f"the fp16 GradScaler skipped this step (gradients overflowed) and lowered the "
                    f"loss scale to {scale:g}; skipped steps are counted, not reported as faults",
                    evidence=evidence,
                    advice=ADVICE_SCALER_SKIP,
                )
            )
        collapsed = scale < self.min_loss_scale
        if (collapsed or self.skip_streak >= self.max_consecutive_skips) and not self.scale_active:
            self.scale_active = True
            out.append(
                Finding(
                    rule=self.rule,
                    severity=Severity.CRITICAL if collapsed else Severity.WARNING,
                    step=rec.step,
                    epoch=rec.epoch,
                    layer=layer_of(rec.first_nonfinite) if rec.first_nonfinite else None,
                    message=f"the fp16 loss scale fell to {scale:g} after {self.skip_streak} skipped "
                    f"step(s) in a row ({self.scaler_skips} in all): gradients overflow at any scale",
                    evidence=evidence,
                    advice=ADVICE_SCALE_COLLAPSE,
                )
            )
        return out

    def check(self, step: int, stats: Stats) -> list[Finding]:
        findings: list[Finding] = []
        for rec in stats.steps:
            loss_bad = rec.loss is not None and not math.isfinite(rec.loss)
            if rec.scaler_skipped and not loss_bad:
                findings.extend(self._scaler(rec))
                continue
            self.skip_streak = 0
            if rec.loss_scale is None or rec.loss_scale >= self.min_loss_scale:
                self.scale_active = False
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
                if rec.loss is None:  # not recorded (manual optimization returning nothing)
                    what = ""
                elif loss_bad:
                    what = f"the loss is {rec.loss:g} and "
                else:
                    what = f"the loss is finite ({rec.loss:.4g}) but "
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
