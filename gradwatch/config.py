"""Every option of ``HealthMonitor``, ``gradwatch.lightning.HealthMonitor``, ``Watch`` and ``Monitor``,
declared, checked and documented once.

The adapters take ``**options`` and hand them to :meth:`Config.build`, which names the public class in
its errors and suggests the closest option for a misspelled keyword. The values the caller passed are
kept as given (never mutated); what the core works with is derived once, here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from gradwatch.detectors import Detector, default_detectors
from gradwatch.detectors.divergence import LOSS_KINDS
from gradwatch.errors import ConfigError, check_positive_int, did_you_mean
from gradwatch.remedies import Remedy, resolve_remedies
from gradwatch.schedules import Schedule, as_schedule
from gradwatch.sinks.alerts import Target, check_targets

#: ``measure=``: every optimizer step, or only the scheduled ones.
MEASURE_MODES = ("every_step", "scheduled")

#: What looks at every step, and so cannot run with ``measure="scheduled"``.
PER_STEP_REMEDIES = ("skip_step", "clip_gradients")

#: The options' documentation, shown in each public class's docstring.
OPTIONS_DOC = """\
        remedies: ``"auto"`` (every remedy: skip_step, clip_gradients, reduce_lr, rollback, reinitialize,
            early_stop, with their defaults), ``"off"`` (observe only), or a list of remedy ids /
            :class:`~gradwatch.remedies.Remedy` objects (e.g. ``[SkipStep(), ReduceLR(factor=0.3)]``).
        every_n_steps: statistics cadence: on every n-th optimizer step gradwatch reads its statistics back
            to the host (one transfer), samples activations and inputs, and runs the detectors. Every
            step's loss and gradient norm are still recorded, on device (unless ``measure="scheduled"``).
            An ``int`` or a ``step -> bool`` callable.
        measure: ``"every_step"`` (default): every optimizer step's loss and gradient norm are recorded on
            device and judged at the next read, and skip_step and clip_gradients act on each step.
            ``"scheduled"``: only the ``every_n_steps`` steps are measured, like ``wandb.watch``'s
            ``log_freq``; between them the hooks return at once. The cheapest mode: the rules see one step
            in n, and skip_step and clip_gradients are not available (``"auto"`` leaves them out).
        probe_every_n_steps: the heavy probes (activation hooks, the input range, the weight copy behind
            update ratios) run on every scheduled step of a run's first 200 steps, then on the first
            scheduled step at least this many steps after the last probe. ``None``: on every scheduled step.
        alert_url: a webhook (e.g. Slack's) to post alerts to: each new warning/critical finding, each
            remedy action and a final message with the summary (see docs/alerts.md).
        alerts: more alert targets: http(s) URLs and/or callables taking the payload dict.
        events_path: the events file; default ``<trainer.log_dir>/gradwatch/events.jsonl`` (Lightning) or
            ``<log_dir>/gradwatch/events.jsonl`` (``Watch``).
        per_layer: also log per-layer (per-module) curves to TensorBoard; totals are always logged.
        activations: sample activation statistics with forward hooks on probe steps.
        inputs: sample the input batch's range on probe steps.
        update_ratio: measure update/weight ratios on probe steps (copies the weights on those steps).
        detectors: the rules to run; default every implemented rule.
        loss: what the training loss is. ``"minimize"`` (default): lower is better (cross-entropy, MSE; a
            loss that goes negative is judged as signed from then on). ``"signed"``: lower is better but
            the loss may be negative (a Gaussian or other negative log-likelihood): no ratio tests.
            ``"surrogate"``: not a progress measure (policy-gradient and actor-critic losses, a GAN's
            losses, many contrastive objectives): the loss-trend rules (divergence, loss_plateau,
            loss_spike) are not run. Whatever the kind, no remedy acts on a loss trend alone.
        print_summary: log the one-screen summary when fit ends.
        snapshot_every: with ``rollback`` on, keep a healthy state in host memory every this many steps (at
            the first healthy read after). Default ``None``: every 20 steps at most, and never more often
            than keeps the copying under 1% of the training time (a large model snapshots less often).
        snapshots: how many such states to keep (memory: this many copies of model + optimizer state).
        name: names the run in alerts, and tells two monitors in one trainer apart in checkpoints.
        val_loss_key: (Lightning) the logged metric to read as validation loss; default the first of
            ``val_loss``, ``val/loss``, ``validation_loss``, ``valid_loss``, ``loss/val`` that is logged."""


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")


def _check_writable(path: str) -> None:
    """``events_path`` names a file that can be created: not a directory, under a folder that exists or
    can be made, and may be written to. A disk that fills up later is the sink's to survive."""
    hint = 'Write e.g. events_path="runs/exp1/events.jsonl", or leave it out.'
    if os.path.isdir(path):
        raise ConfigError(f"events_path {path!r} is a directory; it names the events file. {hint}")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(
            f"events_path {path!r} cannot be created: {folder!r} is not a writable folder. {hint}"
        )


@dataclass(frozen=True, eq=False)
class Config:
    __doc__ = f"""The options of a gradwatch monitor, checked at construction.

    Args:
{OPTIONS_DOC}

    Raises:
        ConfigError: on any bad value or unknown option, with what to write instead.

    Example:
        >>> Config.build("HealthMonitor", {{"every_n_steps": 5}}).schedule(10)
        True
        >>> Config.build("HealthMonitor", {{"evry_n_steps": 5}})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        gradwatch.errors.ConfigError: HealthMonitor() got an unknown option 'evry_n_steps'. Did you mean 'every_n_steps'? ...
    """

    remedies: str | list[str | Remedy] = "auto"
    every_n_steps: int | Schedule = 20
    measure: str = "every_step"
    probe_every_n_steps: int | None = 100
    alert_url: str | None = None
    alerts: Iterable[Target] | None = None
    events_path: str | os.PathLike[str] | None = None
    per_layer: bool = False
    activations: bool = True
    inputs: bool = True
    update_ratio: bool = True
    detectors: Iterable[Detector] | None = None
    loss: str = "minimize"
    print_summary: bool = True
    snapshot_every: int | None = None
    snapshots: int = 2
    name: str | None = None
    val_loss_key: str | None = None

    # derived once, from the options above
    schedule: Schedule = field(init=False, repr=False)
    remedy_list: list[Remedy] = field(init=False, repr=False)
    remedy_mode: str = field(init=False, repr=False)
    detector_list: list[Detector] = field(init=False, repr=False)
    targets: list[Target] = field(init=False, repr=False)
    #: False with ``measure="scheduled"``: steps between scheduled ones are passed over, not measured.
    every_step: bool = field(init=False, repr=False)

    @classmethod
    def build(cls, owner: str, options: Mapping[str, Any], extra: Iterable[str] = ()) -> Config:
        """Check ``options`` (keyword arguments of the public class ``owner``) and build the config.

        ``extra``: the owner's own keywords, offered as suggestions for a misspelled option too.
        """
        known = [f.name for f in fields(cls) if f.init]
        for key in options:
            if key not in known:
                raise ConfigError(
                    f"{owner}() got an unknown option {key!r}.{did_you_mean(key, [*known, *extra])} "
                    f"Its options: {', '.join([*extra, *known])}."
                )
        return cls(**options)

    def __post_init__(self) -> None:
        derived = object.__setattr__
        derived(self, "schedule", as_schedule("every_n_steps", self.every_n_steps, 20))
        if self.measure not in MEASURE_MODES:
            raise ConfigError(
                f"measure must be 'every_step' or 'scheduled', got {self.measure!r}."
                f'{did_you_mean(str(self.measure), MEASURE_MODES)} Write measure="every_step" (the default: '
                'every step\'s loss and gradient norm) or measure="scheduled" (only the every_n_steps steps).'
            )
        if self.probe_every_n_steps is not None:
            check_positive_int("probe_every_n_steps", self.probe_every_n_steps, 100)
        derived(self, "every_step", self.measure == "every_step")
        derived(self, "remedy_mode", self.remedies if isinstance(self.remedies, str) else "custom")
        derived(self, "remedy_list", self._resolve_remedies())
        if self.alert_url is not None and (
            not isinstance(self.alert_url, str) or not self.alert_url.startswith(("http://", "https://"))
        ):
            got = (
                "a string without http:// or https://"
                if isinstance(self.alert_url, str)
                else type(self.alert_url).__name__
            )  # never the value: a webhook URL is a secret
            raise ConfigError(
                f"alert_url must be an http(s) URL string or None, got {got}. "
                'Write e.g. alert_url="https://hooks.slack.com/services/...".'
            )
        derived(self, "targets", check_targets(self.alert_url, self.alerts))
        if self.events_path is not None and not isinstance(self.events_path, str | os.PathLike):
            raise ConfigError(
                f"events_path must be a path (str or os.PathLike) or None, got {self.events_path!r} "
                f'({type(self.events_path).__name__}). Write e.g. events_path="runs/events.jsonl", or leave '
                "it out for <trainer.log_dir>/gradwatch/events.jsonl."
            )
        if self.events_path is not None:
            _check_writable(os.fspath(self.events_path))
        for name in ("per_layer", "activations", "inputs", "update_ratio", "print_summary"):
            _check_bool(name, getattr(self, name))
        if self.loss not in LOSS_KINDS:
            raise ConfigError(
                f"loss must be one of {', '.join(map(repr, LOSS_KINDS))}, got {self.loss!r}."
                f'{did_you_mean(str(self.loss), LOSS_KINDS)} Write loss="signed" for a negative '
                'log-likelihood, loss="surrogate" for a policy-gradient or GAN loss, or leave it out.'
            )
        derived(self, "detector_list", self._resolve_detectors())
        for detector in self.detector_list:
            detector.loss_kind = self.loss  # the rules that read the loss's trend judge by it
        if self.snapshot_every is not None:
            check_positive_int("snapshot_every", self.snapshot_every, 20)
        check_positive_int("snapshots", self.snapshots, 2)
        for name, example in (("name", "baseline"), ("val_loss_key", "val_loss")):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(
                    f'{name} must be a str or None, got {value!r}. Write e.g. {name}="{example}".'
                )

    @property
    def events_file(self) -> str | None:
        """``events_path`` as a string path, or ``None``."""
        return os.fspath(self.events_path) if self.events_path is not None else None

    def _resolve_remedies(self) -> list[Remedy]:
        remedies = resolve_remedies(self.remedies)
        if self.every_step:
            return remedies
        if self.remedies == "auto":  # "auto": every remedy that can act on what is measured
            return [r for r in remedies if r.name not in PER_STEP_REMEDIES]
        per_step = [r.name for r in remedies if r.name in PER_STEP_REMEDIES]
        if per_step:
            kept = [r.name for r in remedies if r.name not in PER_STEP_REMEDIES]
            raise ConfigError(
                f'remedies {per_step} act on every optimizer step, and measure="scheduled" looks at one '
                f'step in every_n_steps. Write remedies={kept!r} (or "auto", which leaves them out '
                'here), or measure="every_step" to keep them.'
            )
        return remedies

    def _resolve_detectors(self) -> list[Detector]:
        if self.detectors is None:
            return default_detectors()
        if isinstance(self.detectors, Detector) or not isinstance(self.detectors, Iterable):
            raise ConfigError(
                f"detectors must be a list of Detector instances, got {self.detectors!r} "
                f"({type(self.detectors).__name__}). Write e.g. detectors=[gradwatch.detectors.NonFinite()] "
                "or leave it out for all rules."
            )
        found = list(self.detectors)
        for d in found:
            if not isinstance(d, Detector):
                raise ConfigError(
                    f"detectors must be Detector instances, got {d!r} ({type(d).__name__}). "
                    "Write e.g. detectors=[gradwatch.detectors.NonFinite()] or leave it out for all rules."
                )
        return found
