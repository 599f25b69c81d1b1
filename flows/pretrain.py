"""Pretrain flow: one model per objective in params (and the unpoisoned controls), with Ray Train.

    python -m flows.pretrain [--params params.yaml] [--objective NAME [--defence NAME | --control]]

With no --objective it trains every `pretrain.objectives` under every `pretrain.defences` on the poisoned
shards and every `pretrain.controls` (without a defence) on the unpoisoned ones, `pretrain.concurrent_runs` at a time (each run is its own
Ray Train trainer with `pretrain.num_workers` workers). RAY_ADDRESS joins an existing Ray cluster.
A finished run is kept in `pretrain.storage_dir`: rerun with a longer list, and only new runs train.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import params_from_argv, prefect_api, stage_command, take_signals, worth_retrying
from tasks import pretrain
from tasks.config import Params

train = task(pretrain.train, name="train", retries=1, retry_delay_seconds=5,  # a retry resumes from the checkpoint
             retry_condition_fn=worth_retrying, task_run_name="train-{objective}-{defence}{control}")


@flow(name="pretrain")
def pretrain_flow(params: Params, runs: list[tuple[str, bool, str]]) -> list[dict]:
    take_signals()
    for objective, control, defence in runs:  # fail fast: every run is checked before the first trains
        pretrain.plan_run(params, objective, control, defence)
    pretrain.init_ray(params.pretrain)  # once, before the runs' threads share it
    futures = [train.submit(params, objective, control, defence) for objective, control, defence in runs]
    results = [f.result() for f in futures]
    create_table_artifact(key="pretrain-runs", table=[{k: str(v) for k, v in r.items()} for r in results],
                          description="pre-trained models")
    return results


def runs_from(params: Params, objective: str | None, control: bool, defence: str = "none") -> list[tuple[str, bool, str]]:
    """(objective, control, pre-training defence) of each run to train."""
    cfg = pretrain.pretrain_config(params)
    if objective:
        return [(objective, control, defence)]
    return [(o, False, d) for o in cfg.objectives for d in cfg.defences] + [(o, True, "none") for o in cfg.controls]


if __name__ == "__main__":
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--objective")
    extra.add_argument("--control", action="store_true", help="train a control: on the unpoisoned (curated) shards")
    extra.add_argument("--defence", default="none", help="a pre-training defence (pretrain.defences' names)")
    args, rest = extra.parse_known_args()
    params = params_from_argv(__doc__, rest, "pretrain")
    runs = runs_from(params, args.objective, args.control, args.defence)
    concurrent = ThreadPoolTaskRunner(max_workers=params.pretrain.concurrent_runs)
    storage = {} if "://" in params.pretrain.storage_dir else {"pretrain.storage_dir": Path(params.pretrain.storage_dir)}
    with stage_command({"pretrain.out_dir": params.pretrain.out_dir} | storage), prefect_api():
        for metrics in pretrain_flow.with_options(task_runner=concurrent)(params, runs):
            print(f"trained {pretrain.run_label(metrics['objective'], metrics['control'], metrics['defence'])}: "
                  f"{metrics['steps']} steps, loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}, "
                  f"{metrics['samples_per_s']:.0f} samples/s")
