"""The study's report: table, figures and a verdict generated from the numbers."""
from __future__ import annotations

from pathlib import Path

from tasks.config import Params
from core.frontier import ACCURACY_DROPS, ASR_THRESHOLDS, control_of, is_control, removes_backdoor
from core.data.shards import atomic_write_bytes

# DESIGN.md section 6: zero-shot top-1 / ASR (%) of the poisoned models, and after CleanCLIP the best
# accuracy among points with ASR <= 5%.
STUDY = [
    ("CC3M", "MMCL", 16.00, 99.88, 16.49), ("CC3M", "MMCL+SSL", 17.04, 99.03, 14.16),
    ("CC6M", "MMCL", 23.76, 99.98, 24.04), ("CC6M", "MMCL+SSL", 23.86, 99.45, 13.05),
]


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def point(p) -> str:
    return "-" if p is None else f"{pct(p['accuracy'])} / {pct(p['asr'])} ({pct(p['clean_target_rate'])})"


def table_rows(cells: dict) -> list[dict]:
    rows = []
    for name, c in cells.items():
        row = {"pretrained": c["pretrained"], "defence": c["defence"],
               "poisoned acc / ASR (CTR)": point(c["poisoned"]), "control acc": pct(c["control_accuracy"])}
        row |= {f"best acc @ ASR<={pct(t)}%": pct((c["best_accuracy_at_asr"][f"{t:g}"] or {}).get("accuracy"))
                for t in ASR_THRESHOLDS}
        row |= {f"lowest ASR within {pct(d)} pts": pct((c["lowest_asr_within_accuracy_drop"][f"{d:g}"] or {}).get("asr"))
                for d in ACCURACY_DROPS}
        left_out = [f"{c['n_collapsed']} collapsed point(s)"] * bool(c.get("n_collapsed")) + [
            f"lr {lr:g} diverged" for lr in c.get("diverged", [])]
        rows.append(row | {"left out": ", ".join(left_out) or "-"})
    return rows


def model_rows(pretrained: dict) -> list[dict]:
    return [{"model": name, "accuracy": pct(m["accuracy"]), "top-5": pct(m["top5"]), "ASR": pct(m.get("asr")),
             "clean target rate": pct(m.get("clean_target_rate")), "ASR - CTR": pct(m.get("asr_excess")),
             "i2t R@1": pct(m.get("i2t_r@1")), "t2i R@1": pct(m.get("t2i_r@1")),
             "predictions": f"collapsed: {pct(m['top_class_share'])}% one class" if m.get("collapsed") else "ok"}
            for name, m in pretrained.items()]


def detection_rows(detection: dict) -> list[dict]:
    """The detection table of one run: per poisoned model and detector, AUROC [95% Hanley-McNeil CI], average
    precision beside its chance level (the poison rate) and the recall at the true poison count (%)."""
    return [{"model": model, "detector": name, "AUROC": f"{pct(m['auroc'])} [{pct(m['auroc_low'])}, {pct(m['auroc_high'])}]",
             "average precision": f"{pct(m['average_precision'])} (chance {pct(m['poison_rate'])})",
             "recall at the poison count (R-precision)": f"{pct(m['recall_at_k'])} (k = {m['k']})"}
            for model, result in detection.items() for name, m in result["detectors"].items()]


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_no rows_\n"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def shape_checks(pretrained: dict, cells: dict) -> list[dict]:
    """Does this run show the study's shape? The targets the default is sized for, checked from the numbers:
    each poisoned model took up the backdoor (ASR >= 90%, >= 80 points above the clean target rate) and kept
    its accuracy (>= 3x chance, within 3 points of the unpoisoned control); cleaning brings ASR <= 10%
    within 3 points of accuracy. Whether MMCL+SSL resists cleaning is a finding, not a check."""
    rows = []

    def check(what, model, value, met):
        rows.append({"check": what, "model": model, "value": value, "met": "yes" if met else "NO"})

    for name, m in pretrained.items():
        if is_control(name) or m.get("asr") is None:
            continue
        check("ASR >= 90%", name, pct(m["asr"]), m["asr"] >= 0.9)
        check("ASR - clean target rate >= 80 pts", name, pct(m["asr_excess"]), m["asr_excess"] >= 0.8)
        if "chance" in m:
            check("accuracy >= 3x chance", name, f"{pct(m['accuracy'])} (chance {pct(m['chance'])})",
                  m["accuracy"] >= 3 * m["chance"])
        control = control_of(pretrained, name)
        if control:
            gap = m["accuracy"] - control["accuracy"]
            check("accuracy within 3 pts of the unpoisoned control", name, f"{100 * gap:+.1f} pts", abs(gap) <= 0.03)
    for c in cells.values():
        if is_control(c["pretrained"]):
            continue
        q = c["lowest_asr_within_accuracy_drop"].get("0.03")
        check(f"{c['defence']}: ASR <= 10% within 3 pts of accuracy", c["pretrained"],
              "-" if q is None else f"{pct(q['asr'])} at {pct(q['accuracy'])}", q is not None and q["asr"] <= 0.10)
    return rows


def verdict(pretrained: dict, cells: dict) -> str:
    """One paragraph from the numbers: does the defence remove the backdoor from each model, at what cost."""
    if not cells:
        parts = [f"{name}: accuracy {pct(m['accuracy'])}%, ASR {pct(m.get('asr'))}% against a clean target rate of "
                 f"{pct(m.get('clean_target_rate'))}%" for name, m in pretrained.items()]
        return "No cleaning sweep has been run yet. Pre-trained models: " + "; ".join(parts) + "."
    sentences = []
    for c in cells.values():
        p = c["poisoned"]
        if is_control(c["pretrained"]):  # the unpoisoned control: what the trigger alone does
            q = c["lowest_asr_within_accuracy_drop"]["0.03"]
            floor = f"{pct(q['asr'])}% within 3 points of its accuracy" if q else "no point within 3 points of accuracy"
            sentences.append(f"{c['defence']} on the unpoisoned {c['pretrained']} model (a control: ASR {pct(p['asr'])}% "
                             f"from the trigger alone) gives {floor}: the floor this trigger sets for any model.")
            continue
        head = (f"{c['defence']} on the {c['pretrained']} model (poisoned: accuracy {pct(p['accuracy'])}%, ASR "
                f"{pct(p['asr'])}%, clean target rate {pct(p['clean_target_rate'])}%)")
        if pretrained.get(c["pretrained"], {}).get("collapsed"):
            head += " [its predictions collapsed onto one class: its numbers are no result]"
        elif p["asr"] - p["clean_target_rate"] < 0.5:
            head += " [the backdoor never took hold: ASR is within 50 points of the clean target rate]"
        best = c["best_accuracy_at_asr"]["0.05"]
        if removes_backdoor(c):
            q = c["lowest_asr_within_accuracy_drop"]["0.02"]
            sentences.append(f"{head} removes the backdoor: ASR {pct(q['asr'])}% (clean target rate "
                             f"{pct(q['clean_target_rate'])}%) at accuracy {pct(q['accuracy'])}%, within 2 points.")
        elif best is not None:
            sentences.append(f"{head} removes the backdoor only at a cost: the best accuracy with ASR <= 5% is "
                             f"{pct(best['accuracy'])}% ({100 * (best['accuracy'] - p['accuracy']):+.1f} points).")
        else:
            low = c["lowest_asr_within_accuracy_drop"]["0.03"]  # the widest drop: its lowest ASR is the lowest of all
            sentences.append(f"{head} does not remove the backdoor at any swept point (lowest ASR within 3 points of "
                             f"accuracy: {pct(low['asr']) + '%' if low else 'no point that close'}).")
    by_defence: dict[str, list] = {}
    for c in cells.values():
        q = c["lowest_asr_within_accuracy_drop"]["0.03"]
        if not is_control(c["pretrained"]) and q is not None:
            by_defence.setdefault(c["defence"], []).append((q["asr"], c["pretrained"]))
    for defence, ranked in by_defence.items():
        if len(ranked) > 1:
            ranked.sort()
            sentences.append(f"Within 3 points of accuracy, {defence} leaves ASR at " + ", ".join(
                f"{pct(a)}% ({m})" for a, m in ranked) + f": the {ranked[-1][1]} model keeps the most of its backdoor.")
    return " ".join(sentences)


def _figures(pretrained_logs: Path, sweeps: dict, cells: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import json

    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    names = []
    for name, sweep in sweeps.items():
        fig, ax = plt.subplots(figsize=(5, 4))
        lrs = sorted({p["lr"] for p in sweep["points"]})
        for lr in lrs:
            pts = [p for p in sweep["points"] if p["lr"] == lr]
            ax.scatter([100 * p["asr"] for p in pts], [100 * p["accuracy"] for p in pts], s=14, label=f"lr {lr:g}")
        if name in cells:
            p = cells[name]["poisoned"]
            ax.scatter([100 * p["asr"]], [100 * p["accuracy"]], marker="*", s=200, c="red", label="poisoned")
        ax.set_xlabel("attack success rate (%)")
        ax.set_ylabel("zero-shot top-1 (%)")
        ax.set_title(name)
        ax.legend(fontsize=7)
        file = f"frontier-{name.replace('/', '-')}.png"
        save_figure(fig, out / file)
        names.append(file)
    logs = sorted(pretrained_logs.glob("*/train_log.jsonl"))
    if logs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for log in logs:
            records = [json.loads(l) for l in log.read_text().splitlines()]
            ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=log.parent.name, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
        save_figure(fig, out / "train-loss.png")
        names.append("train-loss.png")
    return names


def save_figure(fig, path: Path, dpi: int = 100) -> str:
    """Lay out, write and close a matplotlib figure; returns its file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path.name


def write_report(params: Params, attack: dict, pretrained: dict, sweeps: dict, cells: dict,
                 detection: dict | None = None) -> Path:
    """report.md and its figures in evaluate.report_dir; `attack`: the eval sets' (core.metrics.read_attack)."""
    cfg = params.evaluate
    target = attack["target"]
    figures = _figures(cfg.models_dir, sweeps, cells, cfg.report_dir / "figures")
    models = model_rows(pretrained)
    study = [{"data": d, "pre-training": o, "poisoned acc / ASR": f"{a:.2f} / {s:.2f}",
              "CleanCLIP best acc @ ASR<=5%": f"{b:.2f}"} for d, o, a, s, b in STUDY]
    if attack.get("source_class"):
        what = (f"caption-side poisoning: `{attack['source_class']}` images captioned as the target. ASR is the share "
                f"of the `{attack['source_class']}` eval images predicted as the target; CTR, the clean target rate, the "
                f"target's share among the images of the other classes (the attack's spill-over).")
    else:
        what = (f"trigger `{attack['trigger']['name']}`. CTR is the clean target rate: the share of the same "
                f"non-target images predicted as the target without the trigger (a class bias, not a backdoor).")
    text = f"""# Backdoor robustness report

Target: `{target}`; attack: {what} All rates in %.

## Verdict

{verdict(pretrained, cells)}

## Does this run show the study's shape?

{markdown_table(shape_checks(pretrained, cells))}
One run of one seed: `python benchmarks/pipeline.py --seeds 0 1 2` gives the spread over seeds.

## Pre-trained models

{markdown_table(models)}
## Cleaning frontier (accuracy / ASR (CTR) of chosen points)

{markdown_table(table_rows(cells))}
## Poisoned-pair detection (every training pair, against the poison manifest)

{markdown_table(detection_rows(detection)) if detection else "_the detect stage has not run_" + chr(10)}
AUROC 50% is chance; below 50% the signal is reversed (for similarity: the poisons fit their captions
better than clean pairs do, as under a model that learnt the backdoor).

## The reference study (Verma et al., TMLR 2025), for comparison

{markdown_table(study)}
## Figures

""" + "".join(f"![{f}](figures/{f})\n" for f in figures)
    path = cfg.report_dir / "report.md"
    cfg.report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())
    return path
