"""Curate flow: sources in params -> validated webdataset shards under curate.out_dir.

    python -m flows.curate [--params params.yaml]
"""
from __future__ import annotations

from prefect import flow, task, unmapped
from prefect.artifacts import create_table_artifact

from flows.common import (
    make_task_runner, params_from_argv, prefect_api, results, stage_command, take_signals, worth_retrying,
)
from tasks import curate
from tasks.config import Params
from core.data.validation import raise_on_failure

plan = task(curate.plan_partitions, name="plan-partitions")
process = task(curate.process_partition, name="process-partition", retries=2, retry_delay_seconds=2,
               retry_condition_fn=worth_retrying, task_run_name="partition-{part.index}")
finalize = task(curate.finalize, name="finalize-shards")
validate = task(curate.validate_curated, name="validate-manifests")
publish = task(curate.publish, name="publish")


@flow(name="curate")
def curate_flow(params: Params) -> dict:
    take_signals()
    parts = plan(params)
    partial = finalize(params, results(process.map(unmapped(params), parts)))
    raise_on_failure(validate(params, partial))
    out = publish(params, partial)
    stats = curate.read_stats(out)
    create_table_artifact(key="curate-sources", table=curate.stats_rows(stats), description=f"curated into {out}")
    return stats


def run(params: Params) -> dict:
    return curate_flow.with_options(task_runner=make_task_runner(params.curate.runner))(params)


if __name__ == "__main__":
    params = params_from_argv(__doc__)
    folders = {"curate.out_dir": params.curate.out_dir, "curate.staging_dir": params.curate.staging_dir}
    with stage_command(folders), prefect_api():
        stats = run(params)
    print(f"curated {stats['total']['written']} of {stats['total']['seen']} samples; "
          f"quarantined {stats['total']['quarantined'] or 'none'} -> {stats['out_dir']}")
