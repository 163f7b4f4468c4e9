"""Where ``reinitialize`` stands aside: parameters with ``requires_grad=False``, and loaded models.

Pure decisions (``refusal`` returns the reason, or ``None``); :class:`~gradwatch.remedies.Reinitialize` acts.
"""

from __future__ import annotations

from torch import nn

from gradwatch.probes.dataflow import Pair


def frozen_module(named: dict[str, nn.Module], *names: str | None) -> str | None:
    """The first of the modules ``names`` with a parameter that has ``requires_grad=False``."""
    for n in names:
        m = named.get(n) if n is not None else None
        if m is not None and any(not p.requires_grad for p in m.parameters(recurse=False)):
            return n
    return None


def resumed_from_checkpoint(model: nn.Module) -> bool:
    """Lightning: ``trainer.ckpt_path`` (public) is set while a fit runs from ``fit(ckpt_path=...)``. The
    Lightning-free :class:`~gradwatch.remedies.context.Context` does not carry it (yet): it is read here only.
    """
    try:
        trainer = (
            model.trainer
        )  # a LightningModule's; AttributeError on a plain module, RuntimeError unattached
    except Exception:
        return False
    return getattr(trainer, "ckpt_path", None) is not None


def loaded(model: nn.Module, pretrained: bool, resumed: bool) -> str | None:
    """Why ``model``'s weights count as loaded rather than freshly initialized, or ``None``.

    Loaded: ``pretrained=True`` was given, the fit resumed from a checkpoint (``resumed``: gradwatch's own
    state was restored; or Lightning's ``fit(ckpt_path=...)``), or a parameter has ``requires_grad=False``
    (a frozen part is a pretrained part). The weights' scale itself is no evidence: N(0, 1) weights are the
    very fault ``poor_initialization`` reports.
    """
    if pretrained:
        return "Reinitialize(pretrained=True) says its weights were loaded"
    if resumed or resumed_from_checkpoint(model):
        return "the fit resumed from a checkpoint"
    frozen = next((n for n, p in model.named_parameters() if not p.requires_grad), None)
    return f"{frozen} has requires_grad=False (a frozen, pretrained part)" if frozen is not None else None


def refusal(
    rule: str,
    layer: str | None,
    model: nn.Module,
    pair: Pair | None,
    pretrained: bool = False,
    resumed: bool = False,
) -> str | None:
    """Why a ``rule`` finding on ``layer`` (fed/read as ``pair`` says) must get no action, or ``None``."""
    if rule == "poor_initialization":
        why = loaded(model, pretrained, resumed)
        return None if why is None else f"the model was loaded, not freshly initialized: {why}"
    if pair is None:
        return None
    touched = (pair.producer, *pair.norms, pair.consumer) if rule == "dead_units" else (pair.producer,)
    frozen = frozen_module(dict(model.named_modules()), *touched)
    if frozen is None:
        return None
    return (
        f"{frozen} has parameters with requires_grad=False: a frozen, presumably pretrained, part of the "
        "model is never re-initialized"
    )
