"""The whole study as one Prefect flow: curate -> poison -> pretrain -> clean -> evaluate, each stage
through DVC (`dvc repro <stage>`: an unchanged stage is skipped, dvc.lock records lineage), with retries
on transient failures; ends with the study's table and verdict as artifacts.

    python -m flows.pipeline [--params params/smoke-224.yaml]

The stages read params.yaml (DVC's params file); `--params FILE` writes FILE there in full first.
Vary it with `dvc exp run -S key=value`.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.common import (
    params_from_argv, prefect_api, stage_command, stopping, take_signals, terminate_tree, worth_retrying,
)
from tasks import report
from core.errors import InputError
from tasks.config import STAGES, Params



class StageInputError(InputError):
    """A stage stopped on bad input (its `error:` line): rerunning it would fail the same way."""


@task(name="dvc-repro", retries=1, retry_delay_seconds=10, retry_condition_fn=worth_retrying,
      task_run_name="dvc-repro-{stage}")
def repro(stage: str, cwd: str | None = None) -> dict:
    """`dvc repro` one stage (a foreach/matrix group runs all its items) in the DVC project `cwd` (default:
    here), its output streamed to the log."""
    logger = get_run_logger()
    if stopping():
        raise RuntimeError(f"dvc repro {stage}: not started, the command is stopping")
    started, lines = time.time(), []
    with subprocess.Popen(["dvc", "repro", stage], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        try:
            for line in proc.stdout:
                lines.append(line.rstrip())
                if line.strip():
                    logger.info(line.rstrip())
        except BaseException:  # a termination raised here: DVC's stage command stops too, not only DVC
            terminate_tree(proc.pid, wait=30)
            raise
    if proc.returncode:
        said = [line for line in lines if line.startswith("error: ")]
        if said:
            raise StageInputError(f"dvc repro {stage}: {said[-1]}")
        tail = "\n".join(lines[-40:])
        raise RuntimeError(f"dvc repro {stage} failed (exit {proc.returncode}):\n{tail}")
    ran = any(line.startswith("Running stage") for line in lines)
    cached = any("is cached - skipping run" in line for line in lines)  # DVC's run-cache: outputs checked out
    return {"stage": stage, "ran": ran, "cached": cached, "seconds": round(time.time() - started, 1)}


@task(name="study-summary")
def summary(params: Params) -> dict:
    import json

    cells = json.loads((params.evaluate.metrics_dir / "frontier.json").read_text())
    pretrained = json.loads((params.evaluate.metrics_dir / "pretrain.json").read_text())
    rows = report.table_rows(cells) or report.model_rows(pretrained)
    verdict = report.verdict(pretrained, cells)
    detected = params.evaluate.detection
    detection = report.detection_rows(json.loads(detected.read_text())) if detected.is_file() else []
    create_table_artifact(key="study-table", table=rows, description="the study's table (pipeline)")
    create_markdown_artifact(key="study-verdict", markdown=verdict, description="verdict (pipeline)")
    return {"rows": rows, "verdict": verdict, "report": str(params.evaluate.report_dir / "report.md"),
            "models": report.model_rows(pretrained), "detection": detection}


@flow(name="pipeline")
def pipeline_flow(params: Params) -> dict:
    take_signals()
    stages = [repro(stage) for stage in STAGES]
    return {"stages": stages} | summary(params)


if __name__ == "__main__":
    # one pipeline per project: a second is refused before it can rewrite params.yaml under the first
    with stage_command({"the pipeline's params file": Path("params.yaml")}):
        params = params_from_argv(__doc__, adopt=True)
        with prefect_api():
            result = pipeline_flow(params)
    for s in result["stages"]:
        print(f"{s['stage']:>18}: {'ran' if s['ran'] else 'up to date'} ({s['seconds']:.0f} s)")
    print()
    print(report.markdown_table(result["models"]))
    print(report.markdown_table(result["rows"]))
    if result["detection"]:
        print(report.markdown_table(result["detection"]))
    print(result["verdict"])
    print(f"\nreport: {result['report']}")
