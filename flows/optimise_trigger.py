"""Optimise-trigger flow: the surrogate model (a Ray Train run), then the patch against it (BadCLIP-style), for
`poison.trigger.name: optimised`; with another trigger it records that nothing was needed.

    python -m flows.optimise_trigger [--params params.yaml]
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from flows.common import params_from_argv, prefect_api, stage_command, take_signals, worth_retrying
from tasks import optimise_trigger, pretrain
from tasks.config import Params

surrogate = task(pretrain.train, name="train-surrogate", retries=1, retry_delay_seconds=5,
                 retry_condition_fn=worth_retrying)  # a retry resumes the run from its checkpoint
optimise = task(optimise_trigger.optimise, name="optimise-patch")


@flow(name="optimise-trigger")
def optimise_trigger_flow(params: Params) -> dict:
    take_signals()
    optimise_trigger.reset_partial(params)
    if not optimise_trigger.needed(params):
        summary = optimise_trigger.not_needed(params)
    else:
        summary = optimise(params, surrogate(optimise_trigger.surrogate_params(params), params.optimise_trigger.surrogate,
                                             control=True))
        create_table_artifact(key="optimised-trigger", table=[{
            "side (px)": summary["side_px"], "loss first -> last": f"{summary['loss']['first']:.4f} -> {summary['loss']['last']:.4f}",
            "surrogate ASR (%) random -> optimised": " -> ".join(
                f"{a['asr']:.1f}" if a else "n/a" for a in summary["surrogate_asr"].values()),
            "seconds": summary["seconds"]}], description="the optimised patch trigger")
    optimise_trigger.publish(params)
    return summary


if __name__ == "__main__":
    params = params_from_argv(__doc__, section="optimise_trigger")
    cfg = params.optimise_trigger
    storage = {} if "://" in params.pretrain.storage_dir else {"pretrain.storage_dir": Path(params.pretrain.storage_dir)}
    with stage_command({"optimise_trigger.out_dir": cfg.out_dir} | storage), prefect_api():
        summary = optimise_trigger_flow(params)
    if summary["optimised"]:
        asr = summary["surrogate_asr"]
        print(f"optimised a {summary['side_px']}px patch toward {summary['target']!r} in {summary['seconds']['optimise']} s: "
              f"loss {summary['loss']['first']:.4f} -> {summary['loss']['last']:.4f}; the surrogate's zero-shot ASR "
              + (f"{asr['initial']['asr']:.1f}% (random patch) -> {asr['optimised']['asr']:.1f}%" if asr["optimised"] else "n/a")
              + f" -> {cfg.out_dir}/patch.png")
    else:
        print(summary["note"])
