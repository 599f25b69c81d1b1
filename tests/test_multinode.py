"""Multi-node Ray, for real, on one machine: a head and a second node started with `ray start` (the
README's recipe), pretrain joining them through RAY_ADDRESS with its 2 Ray Train workers one per node,
one worker SIGKILLed mid-run and the run ending exactly as an uninterrupted one, a cleaning sweep spread
over the same nodes by the Ray task runner, and no Ray process left once the cluster is stopped.
Where each worker ran is Ray's own record (the state API of the head's dashboard)."""
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from core.data.shards import file_sha256
from tests.conftest import clean_params, complete_checkpoints, log_of, poisoned_tiny, pretrain_params

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

# 192 pairs at batch 16: 12 steps an epoch, 24 in all, checkpoints at steps 5, 10, 15, 20 (each mid-epoch)
# and 24; the kill lands a step or two after the first. One thread per worker: same floats in both runs.
SETTINGS = {"num_workers": 2, "epochs": 2, "batch_size": 16, "checkpoint_every": 5, "log_every": 1,
            "max_failures": 1, "threads_per_worker": 1}
STEPS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A head and a second node, each a `ray start --block` in its own session, so that stopping them
    stops this cluster's processes only (`ray stop` would stop every Ray on the machine). One CPU a
    node: a Ray Train worker or a sweep run asks for one, so two of them must use both nodes."""

    def __init__(self):
        self.temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
        self.address = f"127.0.0.1:{free_port()}"
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, str] = {}  # Ray's node id -> "head" / "second"

    def start_node(self, name: str, *args: str) -> None:
        # free ports for the defaults that other Ray sessions on the machine may hold (agent 52365, ...)
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--num-cpus=1", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={free_port()}", *args]
        # The project sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Makefile, conftest, pretrain's init_ray), which
        # keeps a Ray on the loopback and makes `ray start --address` refuse to join. RAY_ADDRESS: the nodes'
        # workers ask the state API (Train's placement group cleaner) and, on a machine with other Rays, would
        # not know which is theirs. A SIGTERMed node would wait up to 30 s for a drain that only Serve needs.
        env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_ADDRESS=self.address,
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        log = self.temp / f"{name}.log"
        with log.open("w") as out:
            self.nodes[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            assert self.nodes[name].poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)

    def processes(self) -> list[psutil.Process]:
        procs = []
        for popen in self.nodes.values():
            try:
                root = psutil.Process(popen.pid)
                procs += [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        return procs

    def actors(self, class_name: str, **filters) -> list:
        from ray.util.state import list_actors

        return list_actors(address=self.dashboard, filters=[("class_name", "=", class_name)] +
                           [(k, "=", v) for k, v in filters.items()], detail=True, raise_on_missing_output=False)

    def stop(self) -> list[str]:
        """Stop both nodes (SIGTERM: `ray start --block` stops its node's processes, workers included);
        the processes that had not ended 30 s later, killed then."""
        procs = self.processes()
        for popen in self.nodes.values():
            popen.terminate()
        _, stuck = psutil.wait_procs(procs, timeout=30)
        named = []
        for p in stuck:  # killed, so that nothing outlives the test, and reported
            with contextlib.suppress(psutil.Error):
                named.append(f"{p.pid} {p.name()}")
                p.kill()
        return named


def alive(p: psutil.Process, naming: str = "") -> bool:
    """p runs (a zombie does not), and its command line contains `naming`."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE and naming in " ".join(p.cmdline())
    except psutil.Error:
        return False


@pytest.fixture(scope="module")
def cluster():
    from ray.util.state import list_nodes

    c = Cluster()
    try:
        c.start_node("head", "--head", f"--port={c.address.split(':')[1]}", f"--temp-dir={c.temp}",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={c.dashboard.rsplit(':')[-1]}",
                     f"--ray-client-server-port={free_port()}")
        c.start_node("second", f"--address={c.address}")
        deadline = time.time() + 60
        while len(nodes := list_nodes(address=c.dashboard, filters=[("state", "=", "ALIVE")])) < 2:
            assert time.time() < deadline, nodes
            time.sleep(0.2)
        c.node_ids = {n.node_id: "head" if n.is_head_node else "second" for n in nodes}
        assert any(alive(p, naming=str(c.temp)) for p in psutil.process_iter())  # what the last check looks for
        yield c
    finally:
        import ray

        ray.shutdown()  # the tests' connections, before their cluster goes
        stuck = c.stop()
        time.sleep(1)  # workers exit when their raylet is gone
        # raylet, gcs_server, log monitors and agents name the session folder in the temp dir
        left = [f"{p.pid} {p.name()}" for p in psutil.process_iter() if alive(p, naming=str(c.temp))]
        shutil.rmtree(c.temp, ignore_errors=True)
        assert not stuck and not left, f"Ray processes left: {stuck + left}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """test_pretrain's tiny corpus (192 pairs, 3 shards of 64), poisoned for the cleaning sweep."""
    root = tmp_path_factory.mktemp("multinode")
    return root, poisoned_tiny(root, train_pairs=192)


def kill_a_worker_after_a_checkpoint(cluster: Cluster, storage: Path, killed: dict) -> None:
    """SIGKILL the Train worker on the second node once a checkpoint of the run is complete in storage."""
    try:
        deadline = time.time() + 180
        while not complete_checkpoints(storage):
            assert time.time() < deadline, "no checkpoint"
            time.sleep(0.05)
        (victim,) = [a for a in cluster.actors("RayTrainWorker", state="ALIVE") if cluster.node_ids[a.node_id] == "second"]
        psutil.Process(victim.pid).kill()
        killed.update(pid=victim.pid, actor=victim.actor_id, checkpoints=complete_checkpoints(storage))
    except Exception as err:  # noqa: BLE001 (reported by the test, which reads `killed`)
        killed["error"] = repr(err)


def test_pretrain_over_two_nodes_survives_a_killed_worker(cluster, data, monkeypatch):
    from tasks import pretrain

    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    root, _ = data
    runs, killed, before = {}, {}, set()
    for name in ("uninterrupted", "killed"):
        if name == "killed":
            threading.Thread(target=kill_a_worker_after_a_checkpoint, args=(cluster, root / name / "ray", killed),
                             daemon=True).start()
        started = time.time()
        metrics = pretrain.train(pretrain_params(data, root / name, **SETTINGS), "mmcl")
        workers = [a for a in cluster.actors("RayTrainWorker") if a.actor_id not in before]
        before |= {a.actor_id for a in workers}
        groups = {}  # each worker group (the first, and the one FailureConfig restarts) has its placement group
        for a in workers:
            groups.setdefault(a.placement_group_id, []).append(cluster.node_ids[a.node_id])
        runs[name] = {"metrics": metrics, "groups": list(groups.values()), "out": root / name / "models" / "mmcl"}
        print(f"{name}: {time.time() - started:.1f} s, final loss {metrics['final_loss']!r}, worker groups {groups}")

    # every worker group: 2 workers, one on each node
    assert [sorted(g) for g in runs["uninterrupted"]["groups"]] == [["head", "second"]]
    assert [sorted(g) for g in runs["killed"]["groups"]] == [["head", "second"]] * 2
    # the kill: the second node's worker, after a checkpoint and before the end
    assert "pid" in killed, killed
    assert max(killed["checkpoints"]) < STEPS, f"the run finished before the kill: {killed}"
    # rank 0 of the restarted group says where it resumed, in its worker log (both nodes log into the
    # head's session folder here; only the killed run resumed)
    resumed = [m.groups() for f in (cluster.temp / "session_latest" / "logs").glob("worker-*.out")
               for m in re.finditer(r"\[mmcl\] resumed from checkpoint at step (\d+) \(epoch (\d+), batch (\d+);",
                                    f.read_text(errors="replace"))]
    assert len(resumed) == 1, resumed
    step, epoch, batch = map(int, resumed[0])
    print(f"killed {killed}; resumed at step {step} (epoch {epoch}, batch {batch})")
    assert step in killed["checkpoints"] and batch > 0  # from a checkpoint written before the kill, mid-epoch

    # the same run: every step once, the same losses to the last bit, the same exported weights
    logs = {name: log_of(run["out"]) for name, run in runs.items()}
    assert [r["step"] for r in logs["killed"]] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in logs["killed"]] == [r["loss"] for r in logs["uninterrupted"]]
    assert runs["killed"]["metrics"]["final_loss"] == runs["uninterrupted"]["metrics"]["final_loss"]
    assert file_sha256(runs["killed"]["out"] / "model.pt") == file_sha256(runs["uninterrupted"]["out"] / "model.pt")


def test_cleaning_sweep_spreads_over_the_cluster(cluster, data, tmp_path, prefect_api_url):
    """The model the killed run exported, cleaned on the same cluster (clean.runner: ray at its address):
    the sweep's two runs, one on each node, and its sweep.json and best.pt."""
    import ray
    from ray.util.state import list_tasks

    from flows.clean import clean_flow
    from flows.common import make_task_runner

    ray.shutdown()  # pretrain's connection: the task runner joins the cluster itself, from clean.runner.address
    root, _ = data
    params = clean_params(data, tmp_path, models_dir=str(root / "killed" / "models"), epochs=1,
                          runner={"kind": "ray", "address": cluster.address})
    (sweep,) = clean_flow.with_options(task_runner=make_task_runner(params.clean.runner))(params, [("mmcl", "cleanclip")])
    cell = tmp_path / "clean" / "mmcl" / "cleanclip"
    assert sweep["lrs"] == [1e-3, 3e-3] and len(sweep["points"]) == 2
    assert (cell / "best.pt").is_file() and (cell / "sweep.json").is_file()
    deadline = time.time() + 30  # workers send task events to the head about once a second
    while len(tasks := list_tasks(address=cluster.dashboard, filters=[("name", "=", "clean-run")])) < 2:
        assert time.time() < deadline, tasks
        time.sleep(0.5)
    assert sorted(cluster.node_ids[t.node_id] for t in tasks) == ["head", "second"], tasks
