"""The study's accuracy/ASR frontier for one (pretrained objective, cleaning defence) cell.

From the per-epoch points of a cleaning sweep (every learning rate x every epoch): the best zero-shot
accuracy among points with ASR <= 1/5/10/25%, and the lowest ASR among points whose accuracy stays
within 1, 2 and 3 points of the poisoned model's. Each chosen point carries its clean target rate, so a
low ASR that is only a class bias is visible wherever ASR is reported.
"""
from __future__ import annotations

ASR_THRESHOLDS = (0.01, 0.05, 0.10, 0.25)
ACCURACY_DROPS = (0.01, 0.02, 0.03)
CONTROL_PREFIX = "control-"  # models pre-trained on the unpoisoned shards: control-<objective>


def is_control(model: str) -> bool:
    return model.startswith(CONTROL_PREFIX)


def control_name(pretrained: dict, model: str) -> str | None:
    """The unpoisoned control to compare a poisoned model with: its own objective's, else MMCL's; none for a control."""
    if is_control(model):
        return None
    return next((c for c in (CONTROL_PREFIX + model, CONTROL_PREFIX + "mmcl") if pretrained.get(c)), None)


def control_of(pretrained: dict, model: str) -> dict | None:
    """`control_name`'s metrics."""
    name = control_name(pretrained, model)
    return pretrained[name] if name else None


def _point(p: dict | None) -> dict | None:
    if p is None:
        return None
    return {k: p[k] for k in ("accuracy", "asr", "clean_target_rate", "lr", "epoch") if k in p}


def frontier(points: list[dict], poisoned: dict, thresholds=ASR_THRESHOLDS, drops=ACCURACY_DROPS) -> dict:
    """`points`: dicts with accuracy, asr, clean_target_rate, lr, epoch; `poisoned`: accuracy, asr, clean_target_rate.
    Points whose predictions collapsed onto one class (`collapsed`, core/metrics.py) are never chosen."""
    n_collapsed = sum(bool(p.get("collapsed")) for p in points)
    points = [p for p in points if not p.get("collapsed")]
    best_at_asr = {}
    for t in thresholds:
        ok = [p for p in points if p["asr"] <= t]
        best_at_asr[f"{t:g}"] = _point(max(ok, key=lambda p: (p["accuracy"], -p["asr"]))) if ok else None
    lowest_within = {}
    for d in drops:
        ok = [p for p in points if p["accuracy"] >= poisoned["accuracy"] - d - 1e-12]
        lowest_within[f"{d:g}"] = _point(min(ok, key=lambda p: (p["asr"], -p["accuracy"]))) if ok else None
    return {"poisoned": _point(poisoned), "best_accuracy_at_asr": best_at_asr,
            "lowest_asr_within_accuracy_drop": lowest_within, "n_points": len(points),
            "n_collapsed": n_collapsed}


def removes_backdoor(cell: dict, asr: float = 0.05, drop: str = "0.02") -> bool:
    """Whether some swept point brings ASR to <= `asr` while keeping accuracy within `drop`."""
    point = cell["lowest_asr_within_accuracy_drop"].get(drop)
    return point is not None and point["asr"] <= asr
