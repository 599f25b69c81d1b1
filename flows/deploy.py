"""Serve the pipeline as a Prefect deployment on the cron schedule in params (`schedule`).

    .venv/bin/prefect server start --host 127.0.0.1 --port 4200 &
    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python -m flows.deploy

Runs, their stage tasks, logs and the study's table and verdict artifacts appear in the UI at
http://127.0.0.1:4200. A temporary (ephemeral) API cannot schedule, so a server is required.
"""
from __future__ import annotations

import sys

from prefect.settings import PREFECT_API_URL

from flows.common import params_from_argv
from flows.pipeline import pipeline_flow

if __name__ == "__main__":
    params = params_from_argv(__doc__)
    if not PREFECT_API_URL.value():
        sys.exit("error: set PREFECT_API_URL to a running Prefect server (see `python -m flows.deploy --help`)")
    pipeline_flow.serve(name=params.schedule.name, cron=params.schedule.cron,
                        parameters={"params": params.model_dump(mode="json")})
