"""The study as a grid: its members (axis values x data seeds x training seeds), each member's workspace,
and the statistics over the members' metrics (core/stats.py) with the report that answers the question.

A member's workspace is a DVC project of its own (`dvc init --no-scm`) holding a copy of the code, dvc.yaml
and the member's params.yaml: `dvc repro` there runs the real pipeline and its dvc.lock is the member's
lineage. Every member uses this project's DVC cache, so DVC's run-cache hands the outputs of a stage that an
earlier member ran with the same inputs and params (curated and poisoned data across training seeds) to
the next member without running it.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from core.data.shards import atomic_write_bytes, atomic_write_json
from core.errors import InputError
from core.frontier import control_name, is_control
from core.stats import binomial_interval, eval_size_for, mean_interval, paired_contrast, sampling_half_width, seeds_for
from tasks.config import STAGES, ConfigError, Params, dump_params, parse_params
from tasks.report import markdown_table, pct, save_figure

CODE = ("flows", "tasks", "core", "objectives", "defences", "detectors", "models", "expectations")
FILES = ("dvc.yaml", ".dvcignore")
HEADLINE = ("accuracy", "asr", "clean_target_rate")


class StudyError(InputError):
    """A study that cannot run as configured (a member's params invalid, a member's results missing)."""


def _set(raw: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        if not isinstance(node.get(part), dict):
            raise StudyError(f"study.axes: {key}: params has no `{'.'.join(parents[:i + 1])}` section to set it in")
        node = node[part]
    node[last] = value


def _label(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    label = re.sub(r"[^A-Za-z0-9._+-]+", "_", text)
    # folder names stay short; a long value is named by its digest
    return label if len(label) <= 40 else hashlib.sha256(text.encode()).hexdigest()[:12]


def plan(params: Params) -> list[dict]:
    """The study's members in a fixed order: [{name, setting: {axis key: value}, data_seed, seed, params}].

    A member's params are this project's with the axis values set, `seed` = its data seed and `train_seed` =
    its training seed. Raises StudyError naming the member and the key when a member's params are invalid."""
    cfg = params.study
    raw = params.model_dump(mode="json")
    raw.pop("study")
    members = []
    for values in itertools.product(*cfg.axes.values()):
        setting = dict(zip(cfg.axes, values))
        for data_seed, seed in itertools.product(cfg.data_seeds, cfg.seeds):
            name = "_".join([f"{k}={_label(v)}" for k, v in setting.items()] + [f"data{data_seed}-train{seed}"])
            member = copy.deepcopy(raw) | {"seed": data_seed, "train_seed": seed}
            for key, value in setting.items():
                _set(member, key, value)
            try:
                member_params = parse_params(member, origin=f"study member {name}")
            except ConfigError as err:
                raise StudyError(str(err)) from None
            members.append({"name": name, "setting": setting, "data_seed": data_seed, "seed": seed,
                            "params": member_params})
    names = [m["name"] for m in members]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise StudyError(f"study.axes: members would share a workspace: {twice[:3]} (repeated or equal-looking values)")
    for m in members:  # an axis may change what a member trains or cleans
        p = m["params"]
        for objective in cfg.contrast:
            if objective not in p.pretrain.objectives or objective not in p.clean.models:
                raise StudyError(f"study.contrast: {objective!r} must be in pretrain.objectives and clean.models "
                                 f"({p.pretrain.objectives}, {p.clean.models}) of member {m['name']}")
        if cfg.defence not in p.clean.defences:
            raise StudyError(f"study.defence: {cfg.defence!r} is not in clean.defences {p.clean.defences} "
                             f"of member {m['name']}")
    return members


def prepare(member: dict, study_dir: Path, project: Path) -> Path:
    """Create or refresh a member's workspace under `study_dir`/members/: this project's code and dvc.yaml
    (copied, so a code change shows in the member's `dvc status` as in this project's), the member's
    params.yaml, and a DVC project whose cache is `project`/.dvc/cache. Returns the workspace."""
    ws = study_dir / "members" / member["name"]
    ws.mkdir(parents=True, exist_ok=True)
    cache = subprocess.run(["dvc", "cache", "dir"], cwd=project, check=True, capture_output=True, text=True).stdout.strip()
    if not (ws / ".dvc").is_dir():  # a DVC project before any dvc.yaml is there (else this project would collect it)
        subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=ws, check=True, capture_output=True)
    for cmd in (["config", "cache.dir", cache], ["config", "cache.type", "reflink,hardlink,copy"]):
        subprocess.run(["dvc", *cmd], cwd=ws, check=True, capture_output=True)  # every time: a kill may have cut it
    for name in CODE:
        shutil.rmtree(ws / name, ignore_errors=True)
        shutil.copytree(project / name, ws / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in FILES:
        shutil.copy2(project / name, ws / name)
    dump_params(member["params"], ws / "params.yaml")
    return ws


def stage_key(member: dict, stage: str, dvc_stages: dict) -> str:
    """What DVC's run-cache keys `stage` on, as far as params go: the params of the stage and of every stage
    before it (dvc.yaml), with the member's values. Members with the same key share the stage's outputs."""
    raw = member["params"].model_dump(mode="json")
    values = {}
    for name in STAGES[:STAGES.index(stage) + 1]:
        for key in dvc_stages[name].get("params", []):
            node = raw
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            values[key] = node
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def waves(members: list[dict], stage: str, dvc_stages: dict) -> list[list[dict]]:
    """The members in two waves for `stage`: the first member of each stage key, then the rest (whose
    `dvc repro` finds the first's outputs in the run-cache instead of computing them again)."""
    first, rest, seen = [], [], set()
    for m in members:
        key = stage_key(m, stage, dvc_stages)
        (rest if key in seen else first).append(m)
        seen.add(key)
    return [w for w in (first, rest) if w]


def collect(member: dict, ws: Path) -> dict:
    """A member's results from its workspace: pretrain.json, frontier.json, the sweeps' points and
    detection.json (None when its detect stage wrote none)."""
    p = member["params"]
    metrics = ws / p.evaluate.metrics_dir
    try:
        pretrained = json.loads((metrics / "pretrain.json").read_text())
        cells = json.loads((metrics / "frontier.json").read_text())
    except FileNotFoundError as err:
        raise StudyError(f"study member {member['name']}: {err.filename} missing (its evaluate stage has not run)") from None
    sweeps = {f"{f.parent.parent.name}/{f.parent.name}": json.loads(f.read_text())["points"]
              for f in sorted((ws / p.clean.out_dir).glob("*/*/sweep.json"))}
    detection = ws / p.evaluate.detection
    return {"pretrained": pretrained, "cells": cells, "sweeps": sweeps, "attack": attack_name(p),
            "detection": json.loads(detection.read_text()) if detection.is_file() else None}


def attack_name(params: Params) -> str:
    """The member's attack in a table: its trigger, or `caption: <source> -> <target>` for caption-side poisoning."""
    trigger = params.poison.trigger
    return f"caption: {trigger.source} -> {params.poison.target}" if trigger.source else trigger.name


def chosen(cell: dict, drop: float) -> dict:
    """The cleaned model a cell stands for: its lowest-ASR point within `drop` of the poisoned model's accuracy,
    or the poisoned model itself when no cleaned point has a lower ASR (as `residual`)."""
    point = cell["lowest_asr_within_accuracy_drop"].get(f"{drop:g}")
    return point if point and point["asr"] < cell["poisoned"]["asr"] else cell["poisoned"]


def matrix(group: list[dict], drop: float) -> dict:
    """{model: {cleaning: {accuracy, asr, clean_target_rate: mean_interval over the replicates}}} for every
    poisoned model (objective x pre-training defence); cleaning "none" is the pre-trained model, each cleaning
    defence its `chosen` point."""
    out = {}
    models = sorted({n for m in group for n in m["result"]["pretrained"] if not is_control(n)})
    for name in models:
        defences = sorted({k.split("/")[1] for m in group for k in m["result"]["cells"] if k.split("/")[0] == name})
        row = {}
        for defence in ["none", *defences]:
            def point(m, defence=defence):
                if defence == "none":
                    return m["result"]["pretrained"].get(name)
                cell = m["result"]["cells"].get(f"{name}/{defence}")
                return chosen(cell, drop) if cell else None
            row[defence] = {metric: mean_interval(values) for metric in HEADLINE
                            if (values := units(group, lambda m: (point(m) or {}).get(metric)))}
        out[name] = row
    return out


DETECTION = ("auroc", "average_precision", "recall_at_k")


def detection(group: list[dict]) -> dict:
    """{model: {detector: {auroc, average_precision, recall_at_k: mean_interval over the replicates}}} from the
    members' detection.json."""
    out = {}
    found = [m["result"].get("detection") or {} for m in group]
    for name in sorted({n for d in found for n in d}):
        detectors = sorted({k for d in found for k in d.get(name, {}).get("detectors", {})})
        out[name] = {det: {metric: mean_interval(values) for metric in DETECTION if (values := units(
            group, lambda m: ((m["result"].get("detection") or {}).get(name, {}).get("detectors", {}).get(det) or {}).get(metric)))}
            for det in detectors}
    return out


def residual(cell: dict | None, drop: float) -> float | None:
    """Residual ASR at matched accuracy: the lowest ASR among the cleaned points within `drop` of the
    poisoned model's accuracy, or the poisoned model's own ASR (not cleaning is always within) when lower."""
    if cell is None:
        return None
    point = cell["lowest_asr_within_accuracy_drop"].get(f"{drop:g}")
    return min(cell["poisoned"]["asr"], point["asr"] if point else 1.0)


def net_residual(result: dict, model: str, defence: str, drop: float) -> float | None:
    """A model's residual ASR minus that of its unpoisoned control cleaned the same way (the trigger's floor)."""
    control = control_name(result["pretrained"], model)
    if control is None:
        return None
    own = residual(result["cells"].get(f"{model}/{defence}"), drop)
    floor = residual(result["cells"].get(f"{control}/{defence}"), drop)
    return None if own is None or floor is None else own - floor


def _with_eval_error(value: float, n: int | None) -> dict:
    low, high = binomial_interval(value, n) if n else (None, None)
    return {"value": value, "eval_low": low, "eval_high": high, "n": n}


def units(group: list[dict], value) -> list:
    """The independent replicates of `value(member)` (None: missing): one per member when the members share
    one data seed; with several data seeds, one per data seed, the mean over its training seeds (members of one
    data seed share data and eval images, so they are not independent of each other)."""
    by_data = {}
    for m in group:
        v = value(m)
        if v is not None:
            by_data.setdefault(m["data_seed"], []).append(v)
    if len(by_data) <= 1:
        return [v for vs in by_data.values() for v in vs]
    return [sum(vs) / len(vs) if isinstance(vs[0], float | int) else tuple(sum(x) / len(vs) for x in zip(*vs))
            for vs in by_data.values()]


def aggregate(members: list[dict], cfg) -> dict:
    """The study's statistics from `members` ([{setting, data_seed, seed, result (collect's)}]) and the
    study config (`defence`, `contrast`, `accuracy_drop`): per setting, each model's headline metrics and
    each cleaned cell's residual ASR as the mean and 95% t interval over the replicates (`units`), with each
    member's binomial (eval sampling) interval for the headline metrics; and the paired contrast of
    `contrast[0]` minus `contrast[1]` in net residual ASR (core.stats.paired_contrast). Rates are fractions."""
    a, b = cfg.contrast
    drop = cfg.accuracy_drop
    settings = {}
    for m in members:
        settings.setdefault(json.dumps(m["setting"], sort_keys=True), []).append(m)
    out = []
    for group in settings.values():
        models = sorted({name for m in group for name in m["result"]["pretrained"]})
        per_model = {}
        for name in models:
            entry = {}
            for metric in HEADLINE:
                values = units(group, lambda m: m["result"]["pretrained"].get(name, {}).get(metric))
                if not values:
                    continue
                n_key = {"accuracy": "n", "asr": "n_asr", "clean_target_rate": "n_clean_target"}[metric]
                rows = [m["result"]["pretrained"][name] for m in group if m["result"]["pretrained"].get(name, {}).get(metric) is not None]
                entry[metric] = mean_interval(values) | {"seeds": [_with_eval_error(r[metric], r.get(n_key)) for r in rows]}
            per_model[name] = entry
        cleaned = {}
        for name in models:
            values = units(group, lambda m: residual(m["result"]["cells"].get(f"{name}/{cfg.defence}"), drop))
            if not values:
                continue
            nets = units(group, lambda m: net_residual(m["result"], name, cfg.defence, drop))
            cleaned[name] = {"residual_asr": mean_interval(values) | {"seeds": values},
                             "net_residual_asr": (mean_interval(nets) | {"seeds": nets}) if nets else None}

        def pair(m):
            x, y = (net_residual(m["result"], o, cfg.defence, drop) for o in (a, b))
            return None if x is None or y is None else (x, y)
        pairs = units(group, pair)
        contrast = paired_contrast(*zip(*pairs)) if pairs else None
        n_asr = max((r.get("n_asr") or 0 for m in group for r in m["result"]["pretrained"].values()), default=0)
        out.append({"setting": group[0]["setting"], "attack": group[0]["result"].get("attack"),
                    "replicates": [(m["data_seed"], m["seed"]) for m in group],
                    "unit": "data seed" if len({m["data_seed"] for m in group}) > 1 else "seed",
                    "controls": [control_name(group[0]["result"]["pretrained"], o) for o in (a, b)],
                    "models": per_model, "cleaned": cleaned, "contrast": contrast, "n_asr": n_asr,
                    "matrix": matrix(group, drop), "detection": detection(group)})
    return {"defence": cfg.defence, "contrast": [a, b], "accuracy_drop": drop, "settings": out}


def _ci(stat: dict | None) -> str:
    if stat is None:
        return "-"
    if stat["low"] is None:
        return f"{pct(stat['mean'])} (1 seed)"
    return f"{pct(stat['mean'])} [{pct(stat['low'])}, {pct(stat['high'])}]"


def _setting_name(setting: dict) -> str:
    return ", ".join(f"{k} = {v}" for k, v in setting.items()) or "the default setting"


def answer(study: dict) -> str:
    """The report's section "Does backdoor mitigation depend on the pre-training objective here?", from the
    numbers: the contrast with its interval and tests, the control's floor, the eval's sampling error, and
    what would make it decisive."""
    a, b = study["contrast"]
    drop = pct(study["accuracy_drop"])
    lines = ["## Does backdoor mitigation depend on the pre-training objective here?", "",
             f"The contrast: residual ASR after {study['defence']} (the lowest ASR within {drop} points of the "
             f"poisoned model's accuracy, or the poisoned ASR when no cleaned point stays that close), net of the "
             f"unpoisoned control cleaned the same way, of {a} minus {b}, paired seed by seed. Positive: {a} keeps "
             f"more of its backdoor.", ""]
    for s in study["settings"]:
        c, unit = s["contrast"], s["unit"]
        lines.append(f"**{_setting_name(s['setting'])}** ({len(s['replicates'])} runs; replicate: the {unit}):")
        if c is None:
            lines += [f"- no contrast: {a} or {b}, or their control, was not cleaned with {study['defence']}", ""]
            continue
        cleaned = s["cleaned"]
        half = sampling_half_width(s["n_asr"]) if s["n_asr"] else None
        interval = "" if c["low"] is None else f", 95% CI [{pct(c['low'])}, {pct(c['high'])}]"
        lines.append(f"- {a} - {b}: {pct(c['mean'])} points{interval}; per {unit} "
                     f"{', '.join(pct(d) for d in c['differences'])}; {c['positive']} of {c['n']} positive, "
                     f"sign test p = {c['sign_test_p']:.3g}, sign-flip permutation p = {c['permutation_p']:.3g} "
                     f"(the smallest p {c['positive'] + c['negative']} non-tied pairs allow: {c['smallest_p']:.3g}).")
        for m in (a, b):
            net = cleaned.get(m, {}).get("net_residual_asr")
            if not net:
                continue
            checks = []
            if net["low"] is not None:
                checks.append(("the spread over replicates", net["low"] > 0))
            if half is not None:
                checks.append(("the eval's sampling error", net["mean"] > half * 2 ** 0.5))
            above = [what for what, ok in checks if ok]
            within = [what for what, ok in checks if not ok]
            said = (f"above the control's floor beyond {' and '.join(above)}" if above and not within else
                    f"not clearly above the control's floor: within {' and '.join(within)}" if within else
                    "one replicate and no eval size: nothing to compare it with")
            lines.append(f"- {m}: net residual ASR {_ci(net)}: {said}.")
        for control in dict.fromkeys(c for c in s["controls"] if c):
            floor = cleaned.get(control, {}).get("residual_asr")
            if floor:
                shared = " Both objectives are netted against it, so it cancels in their difference." \
                    if s["controls"][0] == s["controls"][1] else ""
                lines.append(f"- The floor ({control}, cleaned the same way): residual ASR {_ci(floor)}, the "
                             f"trigger's own effect.{shared}")
        if half is not None:
            lines.append(f"- The eval's own sampling error: +-{pct(half)} points on one ASR of {s['n_asr']} "
                         f"images (95% Wilson, at 50%), +-{pct(half * 2 ** 0.5)} on a difference of two.")
        decisive = c["low"] is not None and (c["low"] > 0 or c["high"] < 0) and c["sign_test_p"] < 0.05
        if decisive:
            verdict = "Yes, here: the interval excludes 0 and the sign test is below 0.05."
        else:
            needs = [f"at least {seeds_for(0.05)} {unit}s (an exact two-sided test cannot reach p < 0.05 with "
                     f"fewer)" if c["smallest_p"] >= 0.05 else f"more {unit}s (the interval spans 0 or the test is above 0.05)"]
            if half is not None and abs(c["mean"]) < half * 2 ** 0.5:
                needs.append(f"more eval images (the mean contrast is within one difference's sampling error; "
                             f"+-2 points needs {eval_size_for(0.02)} ASR images)")
            needs.append("the study's scale (CC3M, 64 epochs) to say anything about it")
            verdict = "Not decisively. What would make it decisive: " + "; ".join(needs) + "."
        lines += [f"- {verdict}", ""]
    lines += ["What this shows and does not: the intervals are over the replicates (training seeds on one data seed; "
              "data seeds, each the mean of its training seeds, when the study varies them) and so cover training "
              "noise on these eval images, and data noise where data seeds vary; the eval's own sampling error is "
              "given apart. They say nothing about other data, models, scales or triggers, and a contrast at this "
              "toy scale is not the paper's result.", ""]
    return "\n".join(lines)


def model_rows(study: dict) -> list[dict]:
    rows = []
    for s in study["settings"]:
        for name, entry in s["models"].items():
            cleaned = s["cleaned"].get(name, {})
            rows.append({"setting": _setting_name(s["setting"]), "model": name,
                         "accuracy": _ci(entry.get("accuracy")), "ASR": _ci(entry.get("asr")),
                         "clean target rate": _ci(entry.get("clean_target_rate")),
                         f"residual ASR ({study['defence']})": _ci(cleaned.get("residual_asr")),
                         "net of control": _ci(cleaned.get("net_residual_asr"))})
    return rows


def split_label(model: str) -> tuple[str, str]:
    """(objective, pre-training defence) of a model folder name: mmcl_ssl+safeclip -> (mmcl_ssl, safeclip)."""
    objective, _, defence = model.partition("+")
    return objective, defence or "none"


def _attack(study: dict, s: dict) -> dict:
    """The attack column, when the study's settings differ in attack (an axis of poison.trigger)."""
    return {"attack": s.get("attack") or "-"} if len({x.get("attack") for x in study["settings"]}) > 1 else {}


def matrix_rows(study: dict) -> list[dict]:
    """The defence matrix: (attack x) pre-training objective x pre-training defence x cleaning defence, accuracy,
    ASR and the clean target rate as mean [95% CI] over the replicates (%)."""
    rows = []
    for s in study["settings"]:
        for model, row in s.get("matrix", {}).items():
            objective, pretraining = split_label(model)
            for cleaning, stats in row.items():
                rows.append(_attack(study, s) | {
                            "setting": _setting_name(s["setting"]), "objective": objective, "pre-training defence": pretraining,
                             "cleaning": cleaning, "accuracy": _ci(stats.get("accuracy")), "ASR": _ci(stats.get("asr")),
                             "clean target rate": _ci(stats.get("clean_target_rate"))})
    return rows


def detection_table(study: dict) -> list[dict]:
    """AUROC, average precision and recall at the poison count per poisoned model and detector, mean [95% CI]
    over the replicates (%)."""
    rows = []
    for s in study["settings"]:
        for model, detectors in s.get("detection", {}).items():
            objective, pretraining = split_label(model)
            for name, stats in detectors.items():
                rows.append({"setting": _setting_name(s["setting"]), "objective": objective,
                             "pre-training defence": pretraining, "detector": name, "AUROC": _ci(stats.get("auroc")),
                             "average precision": _ci(stats.get("average_precision")),
                             "recall at the poison count (R-precision)": _ci(stats.get("recall_at_k"))})
    return rows


def dose_response(study: dict, axis: str) -> list[dict]:
    """ASR and net residual ASR against the values of `axis` (e.g. poison.count), per model: the rows of
    the dose-response figure (means and 95% t intervals over seeds)."""
    rows = []
    for s in study["settings"]:
        if axis not in s["setting"]:
            continue
        for name, entry in s["models"].items():
            if is_control(name) or "asr" not in entry:
                continue
            net = s["cleaned"].get(name, {}).get("net_residual_asr")
            rows.append({"x": s["setting"][axis], "model": name, "asr": entry["asr"], "net_residual_asr": net,
                         "other": {k: v for k, v in s["setting"].items() if k != axis}} | _attack(study, s))
    return sorted(rows, key=lambda r: (r["model"], json.dumps(r["other"], sort_keys=True), r["x"]))


def _curve(points: list[dict], poisoned: dict, drops) -> list[float]:
    """Lowest ASR within each accuracy drop (the poisoned point included): one seed's frontier."""
    out = []
    for d in drops:
        ok = [p["asr"] for p in points if p["accuracy"] >= poisoned["accuracy"] - d - 1e-12 and not p.get("collapsed")]
        out.append(min([poisoned["asr"], *ok]))
    return out


def _band(stats: list[dict]) -> tuple[list, list] | None:
    """A dose-response line's band (%), point by point: the 95% t interval over seeds; at a point with one
    seed, the eval's own Wilson interval where the metric has one (ASR, not a net residual); NaN (a gap)
    where neither exists. None when no point has a band."""
    def point(s: dict) -> tuple[float, float]:
        if s["low"] is not None:
            return s["low"] * 100, s["high"] * 100
        seed = s.get("seeds", [None])[0] if s["n"] == 1 else None
        if isinstance(seed, dict) and seed.get("eval_low") is not None:
            return seed["eval_low"] * 100, seed["eval_high"] * 100
        return math.nan, math.nan
    low, high = zip(*(point(s) for s in stats))
    return None if all(math.isnan(v) for v in low) else (list(low), list(high))


def figures(study: dict, members: list[dict], out: Path) -> list[str]:
    """frontier.png: per cleaned model, every seed's swept points and the mean frontier (lowest ASR within
    each accuracy drop, averaged over seeds); dose_response.png when an axis is poison.count or poison.rate
    (log x, 95% bands). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    defence, drops = study["defence"], np.linspace(0, 0.2, 21)
    settings = [s["setting"] for s in study["settings"]]
    names = sorted({k.split("/")[0] for m in members for k in m["result"]["sweeps"] if k.endswith("/" + defence)})
    if names:
        fig, axes = plt.subplots(len(settings), len(names), figsize=(4 * len(names), 3.4 * len(settings)),
                                 squeeze=False, sharex=True, sharey=True)
        for row, setting in enumerate(settings):
            group = [m for m in members if m["setting"] == setting]
            for col, name in enumerate(names):
                ax, curves, accs = axes[row][col], [], []
                for m in group:
                    points, poisoned = m["result"]["sweeps"].get(f"{name}/{defence}"), m["result"]["pretrained"].get(name)
                    if points is None or poisoned is None:
                        continue
                    ax.scatter([p["asr"] * 100 for p in points], [p["accuracy"] * 100 for p in points], s=10, alpha=0.35)
                    ax.scatter([poisoned["asr"] * 100], [poisoned["accuracy"] * 100], marker="x", color="k", s=20)
                    curves.append(_curve(points, poisoned, drops))
                    accs.append(poisoned["accuracy"])
                if curves:
                    ax.plot(np.mean(curves, axis=0) * 100, (np.mean(accs) - drops) * 100, color="k",
                            label=f"mean frontier, {len(curves)} seeds")
                    ax.legend(fontsize=7)
                ax.set_title(f"{name} ({_setting_name(setting)})", fontsize=8)
                ax.set_xlabel("ASR (%)")
                ax.set_ylabel("zero-shot top-1 (%)")
        written.append(save_figure(fig, out / "frontier.png", dpi=110))
    axis = next((k for k in ("poison.count", "poison.rate") if any(k in s for s in settings)), None)
    rows = dose_response(study, axis) if axis else []
    if rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (name, other), series in itertools.groupby(rows, key=lambda r: (r["model"], json.dumps(r["other"]))):
            series = list(series)
            x = [r["x"] for r in series]
            for metric, style in (("asr", "-"), ("net_residual_asr", "--")):
                stats = [r[metric] for r in series]
                if any(s is None for s in stats):
                    continue
                mean = [s["mean"] * 100 for s in stats]
                label = f"{name}{'' if other == '{}' else ' ' + other}: {'ASR' if metric == 'asr' else 'net residual ASR'}"
                line, = ax.plot(x, mean, style, marker="o", label=label)
                band = _band(stats)
                if band:
                    ax.fill_between(x, *band, color=line.get_color(), alpha=0.15)
        ax.set_xscale("log" if min(r["x"] for r in rows) > 0 else "symlog")  # a dose of 0 has no log
        ax.set_xlabel(axis)
        ax.set_ylabel("%")
        ax.set_title("dose-response: mean; band: 95% CI over seeds (ASR with one seed: the eval's Wilson interval)",
                     fontsize=8)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out / "dose_response.png", dpi=110))
    return written


def write_outputs(study: dict, members: list[dict], out: Path) -> Path:
    """study.json, the report (report.md) and its figures in `out`, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "study.json", study | {"members": [
        {k: m[k] for k in ("name", "setting", "data_seed", "seed")} for m in members]})
    images = figures(study, members, out)
    n = len(members)
    text = ["# The study", "",
            f"{n} pipeline runs: {len(study['settings'])} setting(s) x "
            f"{n // max(1, len(study['settings']))} seeds (data seed, training seed: "
            f"{', '.join(f'{d}/{s}' for d, s in study['settings'][0]['replicates'])}). Rates in %, as the mean over "
            "seeds with its 95% t interval; each seed's own eval sampling error is in study.json.", "",
            answer(study), "## Models and cleaning", "", markdown_table(model_rows(study))]
    if any(s.get("matrix") for s in study["settings"]):
        text += ["## Defences: pre-training objective x pre-training defence x cleaning", "",
                 f"Cleaning `none` is the pre-trained (poisoned) model; a cleaning defence's row is the point of its "
                 f"learning-rate x epoch sweep with the lowest ASR within {pct(study['accuracy_drop'])} points of the "
                 f"poisoned model's accuracy (the poisoned model when none is lower), as the residual ASR above.", "",
                 markdown_table(matrix_rows(study))]
    if any(s.get("detection") for s in study["settings"]):
        text += ["## Poisoned-pair detection", "", "Every training pair scored under each poisoned model, against the "
                 "poison manifest. AUROC 50% is chance (below it the signal is reversed); average precision's chance "
                 "level is the poison rate.", "", markdown_table(detection_table(study))]
    text += [f"![{i}]({i})\n" for i in images]
    axis = next((k for k in ("poison.count", "poison.rate") if any(k in s["setting"] for s in study["settings"])), None)
    if axis:
        text += ["## Dose-response", "", markdown_table([
            {k: r[k] for k in ("attack",) if k in r} | {axis: r["x"], "model": r["model"], "ASR": _ci(r["asr"]),
                                                         "net residual ASR": _ci(r["net_residual_asr"])}
            for r in dose_response(study, axis)])]
    atomic_write_bytes(out / "report.md", "\n".join(text).encode())
    return out / "report.md"


def read_dvc_stages(project: Path) -> dict:
    return yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
