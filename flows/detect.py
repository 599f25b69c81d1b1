"""Detect flow: every training pair scored for being poisoned under each poisoned model, by each detector,
measured against the poison stage's ground truth; a Prefect table artifact of the results.

    python -m flows.detect [--params params.yaml]
"""
from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from flows.common import params_from_argv, prefect_api, stage_command
from tasks import detect
from tasks.config import Params
from tasks.report import detection_rows, markdown_table

detect_model = task(detect.detect_model, name="detect", task_run_name="detect-{model_name}")


@flow(name="detect")
def detect_flow(params: Params) -> dict:
    truth = detect.ground_truth(params)
    result = {m: detect_model(params, m, truth) for m in detect.models_of(params)}
    detect.write_metrics(params, result)
    create_table_artifact(key="detection", table=detection_rows(result),
                          description="poisoned-pair detection: AUROC [95% CI], average precision, recall at the poison count (%)")
    return result


if __name__ == "__main__":
    params = params_from_argv(__doc__, section="detect")
    cfg = params.detect
    with stage_command({"detect.out_dir": cfg.out_dir, "detect.metrics_dir": cfg.metrics_dir}), prefect_api():
        result = detect_flow(params)
    print(markdown_table(detection_rows(result)))
