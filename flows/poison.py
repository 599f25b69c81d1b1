"""Poison flow: curated shards -> poisoned shards, ground-truth manifest, eval sets, cleaning subset.

    python -m flows.poison [--params params.yaml]
"""
from __future__ import annotations

from prefect import flow, task, unmapped
from prefect.artifacts import create_table_artifact

from flows.common import (
    make_task_runner, params_from_argv, prefect_api, results, stage_command, take_signals, worth_retrying,
)
from tasks import poison
from tasks.config import Params
from core.data.validation import raise_on_failure

plan = task(poison.plan_poison, name="plan-poisons")
poison_shard = task(poison.poison_shard, name="poison-shard", retries=2, retry_delay_seconds=2,
                    retry_condition_fn=worth_retrying, task_run_name="poison-{shard}")
eval_sets = task(poison.write_eval_sets, name="eval-sets")
cleaning = task(poison.write_cleaning_subset, name="cleaning-subset")
finalize = task(poison.finalize, name="finalize")
validate = task(poison.validate_poisoned, name="validate-poisons")
publish = task(poison.publish, name="publish")


@flow(name="poison")
def poison_flow(params: Params) -> dict:
    take_signals()
    the_plan = plan(params)
    poison.reset_partial(params)
    shards = the_plan["shards"]
    records = results(poison_shard.map(unmapped(params), shards, [the_plan["poisons"].get(s, {}) for s in shards]))
    eval_sizes = eval_sets(params, the_plan)
    n_cleaning = cleaning(params, the_plan)
    partial = finalize(params, the_plan, records, eval_sizes, n_cleaning)
    raise_on_failure(validate(params, partial))
    out = publish(params, partial)
    stats = poison.read_stats(out)
    create_table_artifact(key="poison-summary", table=[{k: str(v) for k, v in stats.items()}],
                          description=f"poisoned data in {out}")
    return stats


def run(params: Params) -> dict:
    poison.poison_config(params)  # a missing section fails before the flow starts
    return poison_flow.with_options(task_runner=make_task_runner(params.poison.runner))(params)


if __name__ == "__main__":
    params = params_from_argv(__doc__, section="poison")
    with stage_command({"poison.out_dir": params.poison.out_dir}), prefect_api():
        stats = run(params)
    print(f"poisoned {stats['poisons']} of {stats['train']} training pairs with {stats['trigger']['name']} -> "
          f"target {stats['target']!r}; ASR set {stats['eval_asr']}, cleaning subset {stats['cleaning']} -> {stats['out_dir']}")
