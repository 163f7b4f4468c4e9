"""``unnormalized_inputs``: input batches far outside a normalized range."""

from __future__ import annotations

from gradwatch.detectors.base import Detector, check_threshold
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


class UnnormalizedInputs(Detector):
    """The first floating tensor of the batch is far from a normalized range.

    Statistic: mean, std and max ``|x|`` of the batch's first floating tensor on scheduled steps.
    Fires when ``|mean| > max_mean`` (4) or ``std > max_std`` (4) or ``max |x| > max_abs`` (100).
    Standardized features, pixels in [0, 1] or [-1, 1], audio in [-1, 1] and embeddings pass; raw
    pixels (0-255, or 0-16 for digits), raw physical units and unscaled counts do not.

    Severity: warning. Evidence: mean, std, max_abs.
    """

    rule = "unnormalized_inputs"
    assumes = (
        "The first floating tensor of a batch is what the model reads, and a well-prepared input has |mean| "
        "and std within 4 and max |x| within 100. Fixed bounds for now; token ids and sparse inputs are not "
        "judged as floats."
    )
    advice = (
        "Inputs are far from a normalized range, which makes the first layer's effective learning rate "
        "huge for large features and tiny for small ones, saturates activations and slows or breaks "
        "training. Standardize features (subtract the mean, divide by the std, e.g. sklearn's "
        "StandardScaler fitted on the training set), or scale images to [0, 1] or [-1, 1]."
    )

    def __init__(self, max_mean: float = 4.0, max_std: float = 4.0, max_abs: float = 100.0) -> None:
        self.max_mean = check_threshold("UnnormalizedInputs", "max_mean", max_mean, example=4.0)
        self.max_std = check_threshold("UnnormalizedInputs", "max_std", max_std, example=4.0)
        self.max_abs = check_threshold("UnnormalizedInputs", "max_abs", max_abs, example=100.0)

    def check(self, step: int, stats: Stats) -> list[Finding]:
        x = stats.inputs
        if x is None:
            return []
        bad = abs(x.mean) > self.max_mean or x.std > self.max_std or x.max_abs > self.max_abs
        if not bad:
            return self.resolve("inputs", step, stats.epoch, None, f"inputs in range: std {x.std:.3g}")
        message = (
            f"input batch has mean {x.mean:.3g}, std {x.std:.3g}, max |x| {x.max_abs:.3g} "
            f"(normalized inputs have |mean| <= {self.max_mean:g}, std <= {self.max_std:g})"
        )
        evidence = {"mean": x.mean, "std": x.std, "max_abs": x.max_abs}
        return self.report(
            "inputs", self.finding(Severity.WARNING, step, stats.epoch, None, message, evidence)
        )
