"""Evaluate flow: every pre-trained model and cleaning sweep -> DVC metrics and plots, the report,
and Prefect artifacts (the table and the verdict).

    python -m flows.evaluate [--params params.yaml]
    python -m flows.evaluate --checkpoint path/model.pt [--model RN50]   # any open_clip state_dict
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.common import params_from_argv, prefect_api, stage_command
from tasks import evaluate, report
from tasks.config import Params

run_evaluation = task(evaluate.run_evaluation, name="evaluate-all")
evaluate_checkpoint = task(evaluate.evaluate_checkpoint, name="evaluate-checkpoint")


@flow(name="evaluate")
def evaluate_flow(params: Params) -> dict:
    result = run_evaluation(params)
    rows = report.table_rows(result["cells"]) or report.model_rows(result["pretrained"])
    create_table_artifact(key="study-table", table=rows, description="accuracy / ASR frontier")
    create_markdown_artifact(key="study-verdict", markdown=report.verdict(result["pretrained"], result["cells"]),
                             description=f"full report: {result['report']}")
    return result


@flow(name="evaluate-checkpoint")
def checkpoint_flow(params: Params, checkpoint: Path, model: str | None) -> dict:
    return evaluate_checkpoint(params, checkpoint, model)


if __name__ == "__main__":
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--checkpoint", type=Path, help="evaluate this state_dict file instead of the pipeline's models")
    extra.add_argument("--model", help="its open_clip model name (default: model_config.json beside it)")
    args, rest = extra.parse_known_args()
    params = params_from_argv(__doc__, rest, "evaluate")
    folders = {} if args.checkpoint else {  # --checkpoint writes nothing
        f"evaluate.{k}": getattr(params.evaluate, k) for k in ("metrics_dir", "plots_dir", "report_dir")}
    with stage_command(folders), prefect_api():
        if args.checkpoint:
            print(json.dumps(checkpoint_flow(params, args.checkpoint, args.model), indent=2))
        else:
            result = evaluate_flow(params)
            print(report.markdown_table(report.table_rows(result["cells"]) or report.model_rows(result["pretrained"])))
            print(report.verdict(result["pretrained"], result["cells"]))
            print(f"report: {result['report']}")
