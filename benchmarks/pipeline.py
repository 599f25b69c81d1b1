"""The main command end to end, once per seed: wall time per stage and in total, peak memory of the
whole process tree (PSS: shared pages counted once), the share of time spent starting Prefect, Ray
and DVC against the work itself, and the study's numbers with their spread over the seeds.

    python benchmarks/pipeline.py [--seeds 0 1 2] [--params params.yaml] [--keep DIR]

Each seed runs `python -m flows.pipeline` in a fresh copy of the project (git and DVC initialised,
no dvc.lock, no data), so every stage runs. Start-up is measured apart, in fresh processes, and
multiplied by the times the pipeline pays it: a temporary Prefect API (once), a stage flow's Prefect
set-up (once per stage), a no-op `dvc repro` (once per stage), Ray's start (once) and a Ray Train
trainer's start (once per pretrained model).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STAGE_LINE = re.compile(r"^\s*(\w+): (ran|up to date) \((\d+) s\)", re.M)


def project_copy(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files, as a fresh clone with this working tree would have."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        if name == "dvc.lock" or not (ROOT / name).is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(PSS, RSS) summed over a process and its descendants: PSS counts each shared page once (split
    between the processes that map it), RSS once per process (torch's libraries in every Ray worker)."""
    pss = rss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss_p = p.memory_info().rss
            # the kernel's own sum (smaps_rollup), not psutil's parse of every mapping in smaps
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                pss_p = next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (psutil.Error, OSError, StopIteration):
            continue
        pss, rss = pss + pss_p, rss + rss_p
    return pss, rss


def run_measured(cmd: list[str], cwd: Path, env: dict) -> tuple[float, tuple[int, int], str]:
    """(wall seconds, peak (PSS, RSS) bytes of the process tree, output)."""
    started = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, lines = (0, 0), []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        pss, rss = tree_memory(proc)
        peak = (max(peak[0], pss), max(peak[1], rss))
        # every 5 s: PSS costs the kernel ~0.2 s of CPU over ~40 processes (Ray's workers map GBs); sampled
        # each second it took 16% of a core from what it measures
        time.sleep(5.0)
    reader.join()
    output = "".join(lines)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{output[-4000:]}")
    return time.perf_counter() - started, peak, output


def wall(cmd: list[str], cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - started


PREFECT_SERVER = """
from flows.common import prefect_api
from prefect import flow
with prefect_api():
    flow(lambda: 1, name="noop")()
"""
PREFECT_FLOW = """
from prefect import flow
import flows.pipeline, flows.pretrain, tasks.curate, tasks.poison, tasks.clean, tasks.evaluate
flow(lambda: 1, name="noop")()
"""
RAY_TRAINER = """
import time
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from tasks.config import load_params
from tasks.pretrain import init_ray
t = time.perf_counter()
init_ray(load_params("params.yaml").pretrain)
started = time.perf_counter()
TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1),
             run_config=RunConfig(name="noop", storage_path="{storage}")).fit()
print(started - t, time.perf_counter() - started)
"""


def startup_costs(repo: Path, env: dict) -> dict:
    """Seconds per start-up, each in a fresh process (minus the interpreter and import cost where noted)."""
    python = [sys.executable, "-c"]
    bare = wall(python + ["import flows.pipeline"], repo, env)
    prefect_server = wall(python + [PREFECT_SERVER], repo, env) - bare
    env_api = dict(env)
    from flows.common import prefect_api  # noqa: E402 (after the sys.path entry)

    with prefect_api() as url:  # stage flows report to the pipeline's API
        env_api["PREFECT_API_URL"] = url
        prefect_flow = wall(python + [PREFECT_FLOW], repo, env_api) - bare
    dvc_noop = wall(["dvc", "repro", "evaluate"], repo, env)  # checks the whole chain: a per-call upper bound
    with tempfile.TemporaryDirectory() as storage:
        out = subprocess.run(python + [RAY_TRAINER.replace("{storage}", storage)], cwd=repo, env=env,
                             capture_output=True, text=True, check=True).stdout.split()
    ray_init, trainer = float(out[-2]), float(out[-1])
    return {"prefect_api": prefect_server, "prefect_flow": prefect_flow, "dvc_repro_noop": dvc_noop,
            "ray_init": ray_init, "ray_trainer": trainer}


def study_numbers(repo: Path) -> dict:
    metrics = repo / "data" / "metrics"
    models = json.loads((metrics / "pretrain.json").read_text())
    cells = json.loads((metrics / "frontier.json").read_text())
    out = {}
    for name, m in models.items():
        out[f"{name}: accuracy"] = m["accuracy"]
        out[f"{name}: ASR"] = m["asr"]
        out[f"{name}: clean target rate"] = m["clean_target_rate"]
    for name, c in cells.items():
        point = c["best_accuracy_at_asr"]["0.1"]
        out[f"{name}: best accuracy with ASR <= 10%"] = point["accuracy"] if point else None
        for drop, point in c["lowest_asr_within_accuracy_drop"].items():
            out[f"{name}: lowest ASR within {float(drop) * 100:g} pts"] = point["asr"] if point else None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--keep", type=Path, help="keep each seed's project copy (data, models, report) under DIR")
    args = ap.parse_args()
    base = Path(args.keep or tempfile.mkdtemp(prefix="bench-pipeline-"))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("PREFECT_API_URL", None)
    params = yaml.safe_load((ROOT / args.params).read_text())
    n_models = len(params["pretrain"]["objectives"]) + len(params["pretrain"].get("controls", []))
    runs = []
    for seed in args.seeds:
        repo = base / f"seed-{seed}"
        shutil.rmtree(repo, ignore_errors=True)
        repo.mkdir(parents=True)
        project_copy(repo)
        (repo / "params.yaml").write_text(yaml.safe_dump(params | {"seed": seed}, sort_keys=False))
        seconds, peak, output = run_measured([sys.executable, "-m", "flows.pipeline"], repo,
                                             env | {"PREFECT_HOME": str(repo / ".prefect")})
        stages = {name: int(s) for name, _, s in STAGE_LINE.findall(output)}
        runs.append({"seed": seed, "total": seconds, "peak_memory": peak, "stages": stages, "study": study_numbers(repo)})
        print(f"seed {seed}: {seconds:.0f} s, peak PSS {peak[0] / 2**30:.2f} GiB (RSS {peak[1] / 2**30:.2f} GiB), "
              f"stages {stages}", flush=True)
    startup = startup_costs(base / f"seed-{args.seeds[-1]}", env | {"PREFECT_HOME": str(base / ".prefect")})
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)

    print("\n== wall time (s) per stage, per seed ==")
    names = list(runs[0]["stages"])
    print(f"{'stage':>10} " + " ".join(f"{'seed ' + str(r['seed']):>8}" for r in runs))
    for name in names + ["total"]:
        values = [r["stages"].get(name, 0) if name != "total" else r["total"] for r in runs]
        print(f"{name:>10} " + " ".join(f"{v:8.0f}" for v in values))
    print(f"{'peak PSS':>10} " + " ".join(f"{r['peak_memory'][0] / 2**30:7.2f}G" for r in runs) + "   (process tree, GiB)")
    print(f"{'peak RSS':>10} " + " ".join(f"{r['peak_memory'][1] / 2**30:7.2f}G" for r in runs) + "   (shared pages per process)")

    total = statistics.mean(r["total"] for r in runs)
    n_stages = len(names)
    paid = {"Prefect (temporary API, once)": startup["prefect_api"],
            f"Prefect (stage flow set-up, x{n_stages})": startup["prefect_flow"] * n_stages,
            f"DVC (no-op repro of the chain, x{n_stages} upper bound)": startup["dvc_repro_noop"] * n_stages,
            "Ray (init, once)": startup["ray_init"],
            f"Ray Train (trainer start, x{n_models})": startup["ray_trainer"] * n_models}
    print("\n== start-up, measured apart and multiplied by the times paid ==")
    for what, seconds in paid.items():
        print(f"{what:>52}: {seconds:6.1f} s  ({seconds / total:5.1%} of the mean total {total:.0f} s)")
    overhead = sum(paid.values())
    print(f"{'all start-up':>52}: {overhead:6.1f} s  ({overhead / total:5.1%}); the work itself: "
          f"{total - overhead:.0f} s ({1 - overhead / total:.1%})")

    print(f"\n== the study's numbers over seeds {args.seeds}: mean, sd, min-max ==")
    print_spread(runs)


def print_spread(runs: list[dict]) -> None:
    """Mean, sd and range of each number over the seeds ('-': no swept point qualified in that seed)."""
    for key in runs[0]["study"]:
        values = [r["study"].get(key) for r in runs]
        known = [v for v in values if v is not None]
        if not known:
            continue
        sd = statistics.stdev(known) if len(known) > 1 else 0.0
        print(f"{key:>58}: {statistics.mean(known):6.1%}  sd {sd:5.1%}  [{min(known):6.1%} {max(known):6.1%}]  "
              + " ".join("-" if v is None else f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
