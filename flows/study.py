"""The study as one Prefect flow: every member of the grid in params' `study` section (axis values x data
seeds x training seeds) runs the real pipeline, `dvc repro` stage by stage in a workspace that is a DVC
project of its own (tasks/study.py); then the statistics over the seeds, the report and its figures.

    python -m flows.study [--params FILE]

Stage by stage, the first member of each group that shares a stage's inputs runs it, then the others, whose
`dvc repro` takes the outputs from DVC's run-cache (curated and poisoned data are made once for all training
seeds); `study.concurrent` members run a stage at once. Each member-stage is a task run ("<member>: <stage>",
tagged with the member) of this one flow run. A rerun resumes: finished stages are up to date in each
member's dvc.lock, and an interrupted stage resumes from its own staging.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import params_from_argv, prefect_api, results, stage_command, take_signals
from flows.pipeline import repro
from tasks import study
from tasks.config import STAGES, Params
from tasks.report import markdown_table

PROJECT = Path(__file__).resolve().parent.parent


@task(name="prepare-members")
def prepare(params: Params) -> list[dict]:
    members = study.plan(params)
    for m in members:
        m["workspace"] = str(study.prepare(m, params.study.dir, PROJECT))
    get_run_logger().info(f"{len(members)} members under {params.study.dir / 'members'}: "
                          + ", ".join(m["name"] for m in members))
    return members


@task(name="study-report")
def report(params: Params, members: list[dict]) -> dict:
    for m in members:
        m["result"] = study.collect(m, Path(m["workspace"]))
    summary = study.aggregate(members, params.study)
    path = study.write_outputs(summary, members, params.study.dir)
    return {"report": str(path), "rows": study.model_rows(summary), "answer": study.answer(summary),
            "matrix": study.matrix_rows(summary), "detection": study.detection_table(summary)}


@flow(name="study")
def study_flow(params: Params) -> dict:
    take_signals()
    logger = get_run_logger()
    members = prepare(params)
    stages = study.read_dvc_stages(PROJECT)
    runs = []
    for stage in STAGES:
        for wave in study.waves(members, stage, stages):
            futures = [repro.with_options(task_run_name=f"{m['name']}: {stage}", tags=[m["name"]]).submit(
                stage, m["workspace"]) for m in wave]
            for m, r in zip(wave, results(futures)):
                runs.append({"member": m["name"]} | r)
                logger.info(f"{m['name']}: {stage} {how(r)} ({r['seconds']:.0f} s); "
                            f"{sum(x['stage'] == stage for x in runs)}/{len(members)} members done with {stage}")
    summary = report(params, members)
    # the flow run's own artifacts: its Artifacts tab shows them first
    create_table_artifact(key="study-grid", table=summary["rows"],
                          description=f"the study: {len(members)} members, mean [95% CI] over seeds (%)")
    create_markdown_artifact(key="study-answer", markdown=summary["answer"], description="the study's contrast")
    if summary["matrix"]:
        create_table_artifact(key="study-defences", table=summary["matrix"], description="objective x pre-training "
                              "defence x cleaning: accuracy, ASR, clean target rate, mean [95% CI] over seeds (%)")
    if summary["detection"]:
        create_table_artifact(key="study-detection", table=summary["detection"],
                              description="poisoned-pair detection per model and detector, mean [95% CI] over seeds (%)")
    return {"stages": runs} | summary


def how(run: dict) -> str:
    return "ran" if run["ran"] else "from the run-cache" if run["cached"] else "up to date"


if __name__ == "__main__":
    params = params_from_argv(__doc__)
    with stage_command({"study.dir": params.study.dir}):  # one study per folder: a second is refused
        with prefect_api():
            runner = ThreadPoolTaskRunner(max_workers=params.study.concurrent)
            result = study_flow.with_options(task_runner=runner)(params)
    for r in result["stages"]:
        print(f"{r['member']:>28} {r['stage']:>16}: {how(r)} ({r['seconds']:.0f} s)")
    print()
    print(markdown_table(result["rows"]))
    print(result["answer"])
    for rows in (result["matrix"], result["detection"]):
        print(markdown_table(rows) if rows else "", end="")
    print(f"report: {result['report']}")
