"""Orchestration helpers shared by the stage flows: params from the command line, task runners."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from prefect.events.worker import EventsWorker
from prefect.futures import wait
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from core.errors import InputError, NO_SPACE, permanent
from tasks.config import ConfigError, Params, RunnerConfig, dump_params, load_params, require_section
from core.locks import exclusive


def params_from_argv(description: str, argv: list[str] | None = None, section: str | None = None,
                     adopt: bool = False) -> Params:
    """Parse `--params FILE` (default params.yaml) and validate it, and that it has the stage's
    `section`, before any work; exit 2 on bad params. With `adopt` (the DVC pipeline), another FILE
    becomes params.yaml."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        if section:
            require_section(params, section, ConfigError)
        if adopt and Path(args.params).resolve() != Path("params.yaml").resolve():
            # DVC reads params.yaml: another file is written there in full (dvc.yaml reads every key)
            print(f"params.yaml: written from {args.params} with every key (DVC's params file)", flush=True)
            dump_params(params, "params.yaml")
        return params
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


class _InputErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed run's exception with its traceback; for bad input the message is the
    whole story (the traceback points into our code and Prefect's, not at the user's file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and permanent(record.exc_info[1]):
            record.exc_info = record.exc_text = None
        return True


def worth_retrying(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry what may pass on (a lost worker, a network hiccup), not
    what would fail again (`core.errors.permanent`), nor anything once the command is stopping."""
    return not stopping() and not permanent(state.data if isinstance(state.data, BaseException) else None)


def _no_space(err: OSError, folders: dict[str, Path]) -> str:
    """One line naming the params keys of the folders out of space: the one holding the file that
    failed, else those on the filesystem with the least space free."""
    def existing(folder: Path) -> Path:
        folder = Path(os.path.abspath(folder))
        while not folder.exists():
            folder = folder.parent
        return folder

    where = Path(os.path.abspath(err.filename)) if err.filename else None
    keys = [k for k, f in folders.items() if where and where.is_relative_to(Path(os.path.abspath(f)))]
    if not keys and folders:
        free = {k: shutil.disk_usage(existing(f)).free for k, f in folders.items()}
        device = {k: existing(f).stat().st_dev for k, f in folders.items()}
        emptiest = min(free, key=free.get)
        keys = [k for k in folders if device[k] == device[emptiest]]
    if not keys:
        return f"{err.strerror}{f': {err.filename}' if err.filename else ''}"
    left = shutil.disk_usage(existing(folders[keys[0]])).free / 2**20
    named = " and ".join(f"{k} ({folders[k]})" for k in keys)
    return (f"no space left on device for {named}: {left:.1f} MiB free there"
            f"{f' (writing {err.filename})' if err.filename else ''}; free space or point "
            f"{' / '.join(keys)} elsewhere, then rerun: finished work is kept")


@contextmanager
def input_errors(folders: dict[str, Path] | None = None):
    """A stage command's bad input (InputError) ends it with one line on stderr and exit 1, and
    Prefect's log lines about it come without a traceback; so does a full disk, named by the params
    key of the stage's output `folders` ({"curate.out_dir": path, ...}) that ran out."""
    quiet = _InputErrorsWithoutTraceback()
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    handlers = {h for lg in loggers for h in lg.handlers}
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        print(f"error: {_no_space(err, folders or {})}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


_SPARED: set[int] = set()  # processes a termination leaves to their owner: the watchdog, the temporary Prefect API
_RECEIVED: list[int] = []  # the termination signals received


def terminate_tree(pid: int, spare: set[int] = frozenset(), wait: float = 0) -> None:
    """SIGTERM to every descendant of process `pid` but those in `spare`, and to `pid` itself unless it is this
    process; waits up to `wait` seconds for them to end (stage commands pass it on to their own children)."""
    import psutil

    try:
        root = psutil.Process(pid)
        targets = [p for p in root.children(recursive=True) if p.pid not in spare]
    except psutil.NoSuchProcess:
        return
    targets += [root] * (pid != os.getpid())
    for p in targets:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(targets, timeout=wait)


def _terminate(signum, frame) -> None:
    """SIGTERM or SIGINT to a command: passed on (SIGTERM) to every process it started, except those in
    `_SPARED`, then the command stops (exit status 128 + signum; KeyboardInterrupt for SIGINT), so a thread
    waiting on a `dvc repro` or a pool worker ends with it instead of keeping the command alive until its
    work is done. The stage commands below stop the same way; the watchdog kills whatever remains. (During a
    flow run Prefect's own handler comes first: it raises in the flow, then sends the signal again, to this.)"""
    _RECEIVED.append(signum)
    terminate_tree(os.getpid(), _SPARED)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def stopping() -> bool:
    """Whether this command received SIGTERM or SIGINT: work queued behind the running tasks (the next member of
    a study wave) must not start while the task runner drains its queue."""
    return bool(_RECEIVED)


def take_signals() -> None:
    """First in a flow that waits on other processes or threads, in a stage command: SIGTERM and SIGINT go to
    `_terminate` during the flow run too. (Prefect's own SIGTERM handler, set for the flow run, raises in the
    flow and lets its task runner wait for the running tasks and their processes to finish first.)"""
    if _SPARED and threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, _terminate)


@contextmanager
def stage_command(folders: dict[str, Path]):
    """What a stage command runs in: a watchdog (flows/reaper.py) that kills the processes it starts
    if it dies (pool workers, the temporary Prefect server, Ray), SIGTERM and SIGINT passed on to them
    (`_terminate`), an exclusive lock on its output `folders` ({params key: folder}; a second run of the
    stage is refused, naming the first), and one-line errors for bad input and a full disk (`input_errors`)."""
    reaper = subprocess.Popen([sys.executable, "-m", "flows.reaper", str(os.getpid())], start_new_session=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _SPARED.add(reaper.pid)
    before = {s: signal.signal(s, _terminate) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with input_errors(folders), exclusive(folders):
            yield
    except BaseException:  # stopped or failed: nothing it started outlives it (a thread joined at exit would
        terminate_tree(os.getpid(), _SPARED)  # wait on its `dvc repro`), even when Prefect's handler took the signal
        raise
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if _RECEIVED:  # the status says why it stopped, whatever Prefect made of the exception
            raise SystemExit(128 + _RECEIVED[0])


def results(futures: list) -> list:
    """The mapped tasks' results, after every one has ended: when one fails, the others finish
    (or fail and remove their partial files) before the flow raises, instead of being killed
    mid-write when the command exits."""
    wait(futures)
    return [f.result() for f in futures]


def make_task_runner(cfg: RunnerConfig):
    """The runner for mapped tasks: local processes, threads, or a Ray cluster (prefect-ray)."""
    if cfg.kind == "process":
        return ProcessPoolTaskRunner(max_workers=cfg.workers)
    if cfg.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    from prefect_ray import RayTaskRunner

    init_kwargs = {} if cfg.address else {"num_cpus": cfg.workers, "include_dashboard": False}
    return RayTaskRunner(address=cfg.address, init_kwargs=init_kwargs)


@contextmanager
def prefect_api():
    """One Prefect API for this run and every process it starts (pool workers, DVC-run stages).

    Uses PREFECT_API_URL when set (e.g. `prefect server start`); otherwise starts one temporary
    local server here and exports its URL, instead of each process starting its own.
    """
    saved = os.environ.get("PREFECT_API_URL")
    url = saved or PREFECT_API_URL.value()
    server = None
    if not url:
        from prefect.server.api.server import SubprocessASGIServer  # the server's imports cost ~2 s: only when needed

        server = SubprocessASGIServer()
        server.start()
        _SPARED.add(server.server_process.pid)  # stopped below, after the logs are sent
        url = server.api_url
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        # Send queued logs and events while the API is still up (else exit waits on retries).
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        if server is not None:
            server.stop()
