"""Clean flow: for each (pretrained model, defence) cell, a learning-rate sweep run in parallel
(mapped tasks on the params' runner: a process pool or a Ray cluster), each run evaluated every epoch.

    python -m flows.clean [--params params.yaml] [--model mmcl --defence cleanclip]
"""
from __future__ import annotations

import argparse
import re

from prefect import flow, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.futures import wait

from flows.common import make_task_runner, params_from_argv, prefect_api, stage_command, take_signals, worth_retrying
from tasks import clean
from core.errors import permanent
from tasks.config import Params

check = task(clean.check_sweep, name="check-sweep")
run = task(clean.clean_run, name="clean-run", retries=1, retry_delay_seconds=5, retry_condition_fn=worth_retrying,
           task_run_name="{model_name}-{defence_name}-lr{lr}")
assemble = task(clean.assemble_sweep, name="assemble-sweep")


class SweepRunsFailed(RuntimeError):
    """Some sweep runs failed (after their retries); every other run finished and was kept."""


@flow(name="clean")
def clean_flow(params: Params, cells: list[tuple[str, str]]) -> list[dict]:
    take_signals()
    for model, defence in cells:  # every cell is checked before any trains
        check(params, model, defence)
    sweeps, failed = [], []
    for model, defence in cells:
        futures = run.map(unmapped(params), unmapped(model), unmapped(defence), params.clean.lrs)
        wait(futures)  # a failed run does not stop the others: each finished run is kept on disk
        runs = [f.result() for f in futures if f.state.is_completed()]
        for lr, f in zip(params.clean.lrs, futures):
            if not f.state.is_completed():
                try:
                    f.result()
                except Exception as err:  # noqa: BLE001 (kept going: each finished run is on disk)
                    if permanent(err):  # bad input or a full disk fails every run alike: say what, not "rerun"
                        raise
                    failed.append(f"{model}/{defence} lr {lr:g}")
        for r in runs:
            create_table_artifact(key=re.sub(r"[^a-z0-9-]", "-", f"clean-{model}-{defence}-lr{r['lr']:.3g}".replace(".", "p").lower()),
                                  table=[{k: round(v, 4) if isinstance(v, float) else v for k, v in p.items()}
                                         for p in r["points"]],
                                  description=f"{model} cleaned with {defence} at lr {r['lr']:g}: per-epoch metrics")
        if len(runs) == len(futures):
            sweeps.append(assemble(params, model, defence, runs))
    if failed:
        raise SweepRunsFailed(f"{len(failed)} sweep run(s) failed: {', '.join(failed)}; the other runs finished and "
                              f"are kept, so a rerun trains only these")
    return sweeps


def cells_from(params: Params, model: str | None, defence: str | None) -> list[tuple[str, str]]:
    cfg = clean.clean_config(params)
    return [(m, d) for m in ([model] if model else cfg.models) for d in ([defence] if defence else cfg.defences)]


if __name__ == "__main__":
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--model", help="a pretrained model folder name (default: clean.models)")
    extra.add_argument("--defence", help="a defence (default: clean.defences)")
    args, rest = extra.parse_known_args()
    params = params_from_argv(__doc__, rest, "clean")
    cells = cells_from(params, args.model, args.defence)
    folders = {f"clean.out_dir ({m}/{d})": clean.cell_dir(params, m, d) for m, d in cells}  # cells may run at once
    with stage_command(folders), prefect_api():
        sweeps = clean_flow.with_options(task_runner=make_task_runner(params.clean.runner))(params, cells)
    for s in sweeps:
        p, b = s["pretrained"], s["best"]
        print(f"{s['model']} / {s['defence']}: accuracy {p['accuracy']:.3f} -> {b['accuracy']:.3f}, "
              f"ASR {p['asr']:.3f} -> {b['asr']:.3f} (clean target rate {b['clean_target_rate']:.3f}) "
              f"at lr {b['lr']:g}, epoch {b['epoch']}")
