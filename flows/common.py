"""Orchestration helpers shared by the stage flows: params from the command line, task runners."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager

from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from tasks.config import ConfigError, InputError, Params, RunnerConfig, load_params


def params_from_argv(description: str, argv: list[str] | None = None) -> Params:
    """Parse `--params FILE` (default params.yaml) and validate it before any work; exit 2 on bad params."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        return load_params(args.params)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


class _InputErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed run's exception with its traceback; for bad input the message is the
    whole story (the traceback points into our code and Prefect's, not at the user's file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], InputError):
            record.exc_info = record.exc_text = None
        return True


@contextmanager
def input_errors():
    """A stage command's bad input (InputError) ends it with one line on stderr and exit 1, and
    Prefect's log lines about it come without a traceback."""
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
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


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
