"""The study grid: members planned from params, statistics on hand-made results, and a real 2-seed study
through `python -m flows.study` (members' DVC projects, the run-cache sharing data, a rerun up to date)."""
import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks import study
from tasks.config import STAGES, parse_params
from tests.conftest import copy_project, tiny_params, write_params


def base_params(tmp_path: Path, **study_cfg) -> dict:
    params = tiny_params(tmp_path, [])
    params |= {"poison": {"count": 8}, "pretrain": {}, "clean": {}, "evaluate": {}, "study": study_cfg}
    return params


def test_plan_crosses_axes_and_seeds(tmp_path):
    params = parse_params(base_params(tmp_path, seeds=[0, 1], data_seeds=[5],
                                      axes={"poison.count": [4, 8], "poison.trigger.patch_size": [0.25]}))
    members = study.plan(params)
    assert [m["name"] for m in members] == [
        "poison.count=4_poison.trigger.patch_size=0.25_data5-train0", "poison.count=4_poison.trigger.patch_size=0.25_data5-train1",
        "poison.count=8_poison.trigger.patch_size=0.25_data5-train0", "poison.count=8_poison.trigger.patch_size=0.25_data5-train1"]
    m = members[1]["params"]
    assert (m.seed, m.train_seed, m.training_seed, m.poison.count, m.poison.trigger.patch_size) == (5, 1, 1, 4, 0.25)
    assert m.study == type(m.study)()  # a member's params carry no grid of their own


def test_plan_names_the_member_and_key_of_a_bad_value(tmp_path):
    params = parse_params(base_params(tmp_path, seeds=[0], axes={"poison.count": [8, 0]}))
    with pytest.raises(study.StudyError, match=r"(?s)study member poison.count=0_data0-train0.*poison.count: Input should be greater"):
        study.plan(params)


def test_stage_waves_share_what_does_not_change(tmp_path):
    """Across training seeds curate and poison run once (the rest take the run-cache's outputs); pretrain
    runs for every seed. Across poison counts, curate alone is shared."""
    stages = yaml.safe_load((Path(study.__file__).parent.parent / "dvc.yaml").read_text())["stages"]
    members = study.plan(parse_params(base_params(tmp_path, seeds=[0, 1, 2], axes={"poison.count": [4, 8]})))
    sizes = {s: [len(w) for w in study.waves(members, s, stages)] for s in STAGES}
    assert sizes == {"curate": [1, 5], "optimise-trigger": [1, 5], "poison": [2, 4], "pretrain": [6], "detect": [6],
                     "clean": [6], "evaluate": [6]}


def result(residuals: dict, accuracy: float = 0.7, n: int = 100, n_asr: int = 50, n_clean_target: int = 50) -> dict:
    """One member's results with the given residual ASR per model (None: no cleaned point within 3 points)."""
    pretrained, cells, sweeps = {}, {}, {}
    for name, res in residuals.items():
        asr = 0.1 if name.startswith("control-") else 0.9
        pretrained[name] = {"accuracy": accuracy, "asr": asr, "clean_target_rate": 0.02, "n": n, "n_asr": n_asr,
                          "n_clean_target": n_clean_target}
        point = None if res is None else {"accuracy": accuracy - 0.02, "asr": res, "clean_target_rate": 0.02}
        cells[f"{name}/cleanclip"] = {"poisoned": {"accuracy": accuracy, "asr": asr},
                                      "lowest_asr_within_accuracy_drop": {"0.01": None, "0.02": point, "0.03": point}}
        sweeps[f"{name}/cleanclip"] = [point or {"accuracy": accuracy - 0.1, "asr": 0.05, "clean_target_rate": 0.02}]
    return {"pretrained": pretrained, "cells": cells, "sweeps": sweeps}


def test_aggregate_contrast_net_of_control(tmp_path):
    cfg = parse_params(base_params(tmp_path)).study
    members = [{"setting": {}, "data_seed": 0, "seed": s, "result": result(
        {"mmcl_ssl": a, "mmcl": b, "control-mmcl": 0.1})} for s, (a, b) in enumerate([(0.5, 0.2), (0.4, 0.1), (0.6, 0.3)])]
    summary = study.aggregate(members, cfg)
    s = summary["settings"][0]
    assert s["cleaned"]["mmcl_ssl"]["net_residual_asr"]["seeds"] == pytest.approx([0.4, 0.3, 0.5])
    c = s["contrast"]
    assert c["differences"] == pytest.approx([0.3] * 3) and c["mean"] == pytest.approx(0.3)
    assert c["positive"] == 3 and c["sign_test_p"] == pytest.approx(0.25)
    acc = s["models"]["mmcl"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.7) and acc["n"] == 3 and acc["seeds"][0]["n"] == 100
    assert acc["seeds"][0]["eval_low"] < 0.7 < acc["seeds"][0]["eval_high"]  # each seed's binomial interval
    text = study.answer(summary)
    assert "mmcl_ssl minus mmcl" in text and "30.0 points" in text and "3 of 3 positive" in text
    assert "Not decisively" in text and "at least 6 seeds" in text  # 3 seeds cannot reach p < 0.05
    assert "+-13.4 points on one ASR of 50" in text  # Wilson at 50% on 50 images: [36.6, 63.4]
    assert "it cancels in their difference" in text  # both objectives netted against control-mmcl


def test_defence_matrix_and_detection_table_over_seeds(tmp_path):
    """Each poisoned model (objective x pre-training defence) gets a row per cleaning: `none` (the pre-trained
    model) and each defence's chosen point, with intervals over the seeds; the detection table likewise."""
    cfg = parse_params(base_params(tmp_path)).study
    members = []
    for seed, (a, b) in enumerate([(0.5, 0.2), (0.4, 0.1), (0.6, 0.3)]):
        r = result({"mmcl_ssl": a, "mmcl+safeclip": b, "control-mmcl": 0.1})
        r["detection"] = {"mmcl+safeclip": {"detectors": {"spectral": {
            "auroc": 0.8 + 0.05 * seed, "average_precision": 0.5, "recall_at_k": 0.4}}}}
        members.append({"name": f"data0-train{seed}", "setting": {}, "data_seed": 0, "seed": seed, "result": r})
    summary = study.aggregate(members, cfg)
    m = summary["settings"][0]["matrix"]
    assert set(m) == {"mmcl_ssl", "mmcl+safeclip"}  # the control is the floor, not a row
    assert set(m["mmcl+safeclip"]) == {"none", "cleanclip"}
    assert m["mmcl+safeclip"]["none"]["asr"]["mean"] == pytest.approx(0.9)
    cleaned = m["mmcl+safeclip"]["cleanclip"]  # the point within 3 accuracy points with the lowest ASR
    assert cleaned["asr"]["mean"] == pytest.approx(0.2) and cleaned["asr"]["low"] < 0.2 < cleaned["asr"]["high"]
    assert cleaned["accuracy"]["mean"] == pytest.approx(0.68)
    d = summary["settings"][0]["detection"]["mmcl+safeclip"]["spectral"]
    assert d["auroc"]["mean"] == pytest.approx(0.85) and d["auroc"]["n"] == 3
    rows = study.matrix_rows(summary)
    assert {(r["objective"], r["pre-training defence"], r["cleaning"]) for r in rows} == {
        ("mmcl_ssl", "none", "none"), ("mmcl_ssl", "none", "cleanclip"), ("mmcl", "safeclip", "none"), ("mmcl", "safeclip", "cleanclip")}
    report = study.write_outputs(summary, members, tmp_path / "out").read_text()
    assert "## Defences: pre-training objective x pre-training defence x cleaning" in report
    assert "| the default setting | mmcl | safeclip | spectral | 85.0 [" in report


def test_attacks_study_plan_and_table(tmp_path):
    """params/attacks.yaml: 3 attacks x 3 seeds; each attack optimises (or skips) its trigger and poisons once for
    all seeds; the matrix and the dose-response carry an attack column (caption: source -> target)."""
    repo = Path(study.__file__).parent.parent
    members = study.plan(parse_params(yaml.safe_load((repo / "params" / "attacks.yaml").read_text())))
    assert len(members) == 9
    caption = next(m["params"] for m in members if m["setting"]["poison.trigger.name"] == "caption")
    assert caption.poison.trigger.placement == "none" and study.attack_name(caption) == "caption: apple -> banana"
    stages = study.read_dvc_stages(repo)
    assert [len(w) for w in study.waves(members, "optimise-trigger", stages)] == [3, 6]
    assert [len(w) for w in study.waves(members, "poison", stages)] == [3, 6]

    cfg = parse_params(base_params(tmp_path)).study
    rows = []
    for attack, count, s in [(a, c, s) for a in ("noise_patch", "caption: apple -> banana") for c in (100, 500) for s in range(2)]:
        name = attack.split(":")[0]
        # caption: the ASR set is the source class (20 images), the clean target rate the other classes (200)
        r = result({"mmcl_ssl": 0.3 + count / 5000, "mmcl": 0.1, "control-mmcl": 0.05},
                   n_asr=20 if name == "caption" else 250, n_clean_target=200 if name == "caption" else 250) | {"attack": attack}
        rows.append({"name": f"{name}-{count}-{s}", "setting": {"poison.trigger.name": name, "poison.count": count},
                     "data_seed": 0, "seed": s, "result": r})
    summary = study.aggregate(rows, cfg)
    caption_mmcl = next(s for s in summary["settings"] if s["attack"] != "noise_patch")["models"]["mmcl"]
    assert [x["n"] for x in caption_mmcl["asr"]["seeds"] + caption_mmcl["clean_target_rate"]["seeds"]] == [20, 20, 200, 200]
    table = study.matrix_rows(summary)
    assert {r["attack"] for r in table} == {"noise_patch", "caption: apple -> banana"}
    assert list(table[0])[:2] == ["attack", "setting"]
    dose = study.dose_response(summary, "poison.count")
    assert {(r["attack"], r["model"], r["x"]) for r in dose} >= {("caption: apple -> banana", "mmcl_ssl", 500)}
    text = study.write_outputs(summary, rows, tmp_path / "out").read_text()
    assert "| caption: apple -> banana | 500 | mmcl_ssl |" in text  # the dose-response per attack


def test_data_seeds_are_the_replicates_when_they_vary(tmp_path):
    """Members of one data seed share its data and eval images: with 2 data seeds x 2 training seeds the
    contrast has 2 replicates, each the mean of its data seed's training seeds (not 4 independent ones)."""
    cfg = parse_params(base_params(tmp_path)).study
    diffs = {(0, 0): 0.1, (0, 1): 0.3, (1, 0): 0.0, (1, 1): -0.2}
    members = [{"setting": {}, "data_seed": d, "seed": t, "result": result(
        {"mmcl_ssl": 0.5 + diff, "mmcl": 0.5, "control-mmcl": 0.1})} for (d, t), diff in diffs.items()]
    s = study.aggregate(members, cfg)["settings"][0]
    assert s["unit"] == "data seed" and s["contrast"]["differences"] == pytest.approx([0.2, -0.1])
    assert s["models"]["mmcl"]["asr"]["n"] == 2 and len(s["models"]["mmcl"]["asr"]["seeds"]) == 4
    assert "per data seed 20.0, -10.0; 1 of 2 positive" in study.answer(study.aggregate(members, cfg))


def test_plan_refuses_members_that_would_share_a_workspace_or_a_contrast_not_run(tmp_path):
    with pytest.raises(study.StudyError, match="share a workspace"):
        study.plan(parse_params(base_params(tmp_path, axes={"poison.count": [8, 8]})))
    with pytest.raises(study.StudyError, match=r"study.contrast: 'siglip' must be in pretrain.objectives"):
        study.plan(parse_params(base_params(tmp_path, contrast=["siglip", "mmcl"])))


def test_residual_falls_back_to_the_poisoned_asr(tmp_path):
    """A model that no cleaning keeps within the accuracy drop keeps its poisoned ASR (not cleaning is
    always within): the contrast stays defined for every seed."""
    cfg = parse_params(base_params(tmp_path)).study
    members = [{"setting": {}, "data_seed": 0, "seed": s, "result": result(
        {"mmcl_ssl": None, "mmcl": 0.2, "control-mmcl": 0.1})} for s in range(2)]
    c = study.aggregate(members, cfg)["settings"][0]["contrast"]
    assert c["differences"] == pytest.approx([0.9 - 0.2] * 2)


def test_dose_response_rows_and_figures(tmp_path):
    cfg = parse_params(base_params(tmp_path)).study
    members = [{"name": f"c{count}-{s}", "setting": {"poison.count": count}, "data_seed": 0, "seed": s,
                "result": result({"mmcl_ssl": 0.1 * s + count / 1000, "mmcl": 0.05, "control-mmcl": 0.02})}
               for count in (10, 100) for s in range(2)]
    summary = study.aggregate(members, cfg)
    rows = study.dose_response(summary, "poison.count")
    assert [(r["model"], r["x"]) for r in rows] == [("mmcl", 10), ("mmcl", 100), ("mmcl_ssl", 10), ("mmcl_ssl", 100)]
    assert rows[3]["net_residual_asr"]["mean"] == pytest.approx(0.05 + 0.1 - 0.02)
    report = study.write_outputs(summary, members, tmp_path / "out")
    text = report.read_text()
    assert "## Dose-response" in text and "poison.count = 100" in text
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "dose_response.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "out" / "study.json").read_text())["members"][0]["name"] == "c10-0"


def test_dose_response_band_is_the_seeds_interval_or_with_one_seed_the_evals(tmp_path):
    cfg = parse_params(base_params(tmp_path)).study
    one = [{"name": f"c{count}", "setting": {"poison.count": count}, "data_seed": 0, "seed": 0,
            "result": result({"mmcl_ssl": 0.5, "mmcl": 0.05, "control-mmcl": 0.02})} for count in (10, 100)]
    rows = study.dose_response(study.aggregate(one, cfg), "poison.count")
    asr = [r["asr"] for r in rows if r["model"] == "mmcl"]
    low, high = study._band(asr)  # the eval's Wilson interval of each point (50 triggered images here)
    assert all(lo < a["mean"] * 100 < hi for lo, hi, a in zip(low, high, asr)) and high[0] - low[0] > 5
    assert study._band([r["net_residual_asr"] for r in rows if r["model"] == "mmcl"]) is None  # no eval n for a net


@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_two_seed_study_through_prefect_and_dvc(tmp_path, prefect_server, browser):
    """Two training seeds through `python -m flows.study` against `prefect server start`: the second seed takes
    the first's curated and poisoned data from DVC's run-cache, each member's dvc.lock records its stages,
    the statistics and report appear, the Prefect UI shows the study's table in a real browser, and a rerun
    finds every stage up to date."""
    from tests.test_pipeline import tiny_study

    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    params = tiny_study(repo)
    params["curate"]["sources"][0]["train_pairs"] = 64
    params["pretrain"] |= {"objectives": ["mmcl", "siglip"], "epochs": 1, "defences": ["none"]}
    params["clean"] |= {"models": ["mmcl", "siglip", "control-mmcl"], "defences": ["cleanclip"]}
    params["study"] = {"seeds": [0, 1], "contrast": ["siglip", "mmcl"]}
    write_params(repo / "params.yaml", params)
    env = dict(os.environ, PREFECT_API_URL=prefect_server,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True)

    def run() -> str:
        proc = subprocess.run([sys.executable, "-m", "flows.study"], cwd=repo, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1400)
        assert proc.returncode == 0, proc.stdout[-8000:]
        return proc.stdout

    first = run()
    how = dict(((m, s), h) for m, s, h in re.findall(r"^\s*(\S+)\s+([\w-]+): (ran|from the run-cache|up to date)", first, re.M))
    assert how[("data0-train0", "curate")] == how[("data0-train0", "poison")] == "ran"
    assert how[("data0-train1", "curate")] == how[("data0-train1", "poison")] == "from the run-cache", first[-4000:]
    assert how[("data0-train1", "optimise-trigger")] == "from the run-cache"  # the data seed's, as poison's
    assert how[("data0-train0", "pretrain")] == how[("data0-train1", "pretrain")] == "ran"
    members = repo / "data" / "study" / "members"
    for seed in (0, 1):
        ws = members / f"data0-train{seed}"
        lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
        assert {"curate", "poison", "pretrain", "evaluate"} <= set(lock)
        assert yaml.safe_load((ws / "params.yaml").read_text())["train_seed"] == seed
    # the same data for both seeds, different models
    assert (members / "data0-train0/data/poisoned/poison_manifest.parquet").read_bytes() == \
        (members / "data0-train1/data/poisoned/poison_manifest.parquet").read_bytes()
    assert (members / "data0-train0/data/models/pretrain/mmcl/model.pt").read_bytes() != \
        (members / "data0-train1/data/models/pretrain/mmcl/model.pt").read_bytes()
    summary = json.loads((repo / "data" / "study" / "study.json").read_text())
    s = summary["settings"][0]
    assert s["contrast"]["n"] == 2 and s["models"]["mmcl"]["asr"]["n"] == 2 and s["models"]["mmcl"]["asr"]["low"] is not None
    assert "Does backdoor mitigation depend on the pre-training objective here?" in \
        (repo / "data" / "study" / "report.md").read_text()
    assert (repo / "data" / "study" / "frontier.png").exists()

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowFilter, FlowFilterName

    async def runs():
        async with PrefectClient(prefect_server) as client:
            flows = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["study"])))
            tasks = await client.read_task_runs()
            table = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["study-grid"])))
            return flows, [t.name for t in tasks if t.flow_run_id == flows[0].id], table
    flows, tasks, table = asyncio.run(runs())
    assert len(flows) == 1 and {"data0-train0: pretrain", "data0-train1: curate"} <= set(tasks)
    ui = prefect_server.removesuffix("/api")
    browser.text_when(f"{ui}/runs/flow-run/{flows[0].id}", "Task Runs", "Artifacts", "data0-train0: curate")
    tabs = browser.find_elements(browser.by.CSS_SELECTOR, "button, a, [role=tab], li")
    next(e for e in tabs if e.text.split("\n")[0].strip() == "Artifacts").click()  # the tab's label (and its count)
    browser.text_when(None, "study-grid", "study-answer")  # the run's Artifacts tab lists both
    shown = browser.text_when(f"{ui}/artifacts/artifact/{table[0].id}", "control-mmcl", "residual ASR (cleanclip)")
    assert re.search(r"siglip\s+\d+\.\d \[", shown)  # a mean with its interval, as the table has it
    browser.save_screenshot(str(tmp_path / "study-grid.png"))

    second = run()  # resumes: every member's every stage is up to date
    assert set(re.findall(r"^\s*\S+\s+\w+: (ran|from the run-cache|up to date)", second, re.M)) == {"up to date"}
    assert json.loads((repo / "data" / "study" / "study.json").read_text()) == summary
