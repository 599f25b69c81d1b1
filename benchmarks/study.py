"""The study end to end: `python -m flows.study` in a fresh copy of the project (no data, no dvc.lock), with
the study in params (default: 3 training seeds). Prints wall time per stage summed over the members and per
member, the first member alone (one seed) against the whole study, peak memory of the process tree, the
share of start-up (Prefect, DVC, Ray; measured apart as in benchmarks/pipeline.py), and the study's answer.

    python benchmarks/study.py [--params params.yaml] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import ROOT, project_copy, run_measured, startup_costs  # noqa: E402

LINE = re.compile(r"^\s*(\S+)\s+(\w+): (ran|from the run-cache|up to date) \((\d+) s\)", re.M)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--keep", type=Path, help="keep the project copy (members, study report) in DIR")
    args = ap.parse_args()
    repo = Path(args.keep or tempfile.mkdtemp(prefix="bench-study-"))
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    project_copy(repo)
    params = yaml.safe_load((ROOT / args.params).read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PREFECT_HOME=str(repo / ".prefect"))
    env.pop("PREFECT_API_URL", None)
    total, peak, output = run_measured([sys.executable, "-m", "flows.study"], repo, env)
    rows = LINE.findall(output)
    per_stage, per_member, how = defaultdict(int), defaultdict(int), defaultdict(list)
    for member, stage, status, seconds in rows:
        per_stage[stage] += int(seconds)
        per_member[member] += int(seconds)
        how[stage].append(status)
    members = list(per_member)
    print(f"== the study: {len(members)} members, {total:.0f} s in all "
          f"(peak PSS {peak[0] / 2**30:.2f} GiB, RSS {peak[1] / 2**30:.2f} GiB over the process tree) ==")
    for stage, seconds in per_stage.items():
        print(f"{stage:>10}: {seconds:6d} s over the members ({', '.join(sorted(set(how[stage])))})")
    for member, seconds in per_member.items():
        print(f"{member:>28}: {seconds:6d} s")
    first = per_member[members[0]]
    print(f"one seed (the first member, which makes the shared data): {first} s; the study: {total:.0f} s "
          f"({total / max(first, 1):.2f}x one seed for {len(members)} seeds)")

    study_dir = repo / params.get("study", {}).get("dir", "data/study")
    startup = startup_costs(study_dir / "members" / members[0], env)  # a member's workspace: its no-op repro
    stage_runs = sum(status == "ran" for _, _, status, _ in rows)
    pretrain_runs = sum(status == "ran" for _, stage, status, _ in rows if stage == "pretrain")
    n_models = len(params["pretrain"].get("objectives", ["mmcl", "mmcl_ssl"])) + len(params["pretrain"].get("controls", []))
    paid = {"Prefect (temporary API, once)": startup["prefect_api"],
            f"Prefect (stage flow set-up, x{stage_runs} stage runs)": startup["prefect_flow"] * stage_runs,
            f"DVC (no-op repro, x{len(rows)} member-stages, upper bound)": startup["dvc_repro_noop"] * len(rows),
            f"Ray (init, x{pretrain_runs})": startup["ray_init"] * pretrain_runs,
            f"Ray Train (trainer start, x{pretrain_runs * n_models})": startup["ray_trainer"] * pretrain_runs * n_models}
    print("\n== start-up, measured apart and multiplied by the times paid ==")
    for what, seconds in paid.items():
        print(f"{what:>58}: {seconds:6.1f} s ({seconds / total:5.1%})")
    print(f"{'all start-up':>58}: {sum(paid.values()):6.1f} s ({sum(paid.values()) / total:5.1%})")
    report = (study_dir / "report.md").read_text()
    print("\n" + report.split("## Models and cleaning")[0])
    print(report.split("## Models and cleaning")[1].split("![")[0])
    if not args.keep:
        shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
