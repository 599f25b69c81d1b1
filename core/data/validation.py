"""Great Expectations suites (JSON files in expectations/) run on pandas tables.

A suite's `{"$PARAMETER": name}` values are filled from params at run time, and an expectation's
`meta.params` names the params keys that set them. `validate` returns a compact, JSON-serialisable
report; `raise_on_failure` turns a failed report into an error naming each failed expectation,
sample offending rows and the params keys that govern it.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pandas as pd

from core.errors import InputError

SUITES_DIR = Path(__file__).resolve().parents[2] / "expectations"  # the repo's suites (JSON)
SAMPLE_ROWS = 10


class ValidationFailed(InputError):
    """Data that failed its suite: one line per failed expectation with up to 5 offending row ids
    (all sampled rows are in the report) and the params keys that govern it."""

    def __init__(self, reports: list[dict]):
        self.reports = reports
        lines = ["data validation failed:"]
        for rep in reports:
            for r in rep["results"]:
                if not r["success"]:
                    ids = [row.get(rep["id_column"], row) if isinstance(row, dict) else row for row in r["sample_rows"]]
                    governed = f" (set by params {', '.join(r['params'])})" if r["params"] else ""
                    lines.append(f"  [{rep['suite']} on {rep['data']}] {r['expectation']}({r['kwargs']}): "
                                 f"{r['unexpected_count']} offending row(s), e.g. {rep['id_column']} {ids[:5]}{governed}")
        super().__init__("\n".join(lines))


@lru_cache(maxsize=1)
def _context():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = ctx.data_sources.add_pandas("tables").add_dataframe_asset("table").add_batch_definition_whole_dataframe("all")
    return ctx, batch


@lru_cache(maxsize=None)
def load_suite(name: str):
    from great_expectations.core import ExpectationSuite

    path = SUITES_DIR / f"{name}.json"
    spec = json.loads(path.read_text())
    ctx, _ = _context()
    return ctx.suites.add(ExpectationSuite(name=spec["name"], expectations=spec["expectations"], notes=spec.get("notes")))


def validate(df: pd.DataFrame, suite: str, parameters: dict, data: str, id_column: str = "key") -> dict:
    """Run `suite` on `df`; offending rows are reported by `id_column`."""
    _, batch = _context()
    result = batch.get_batch(batch_parameters={"dataframe": df.reset_index(drop=True)}).validate(
        load_suite(suite),
        expectation_parameters=parameters,
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [id_column]},
    ).to_json_dict()
    results = []
    for r in result["results"]:
        cfg, res = r["expectation_config"], r.get("result") or {}
        unexpected = res.get("unexpected_index_list") or []
        results.append({
            "expectation": cfg["type"],
            "kwargs": {k: v for k, v in cfg["kwargs"].items() if k not in ("batch_id",)},
            "success": bool(r["success"]),
            "unexpected_count": res.get("unexpected_count", 0 if r["success"] else None),
            "observed_value": res.get("observed_value"),
            "sample_rows": unexpected[:SAMPLE_ROWS],
            "exception": (r.get("exception_info") or {}).get("exception_message"),
            "params": (cfg.get("meta") or {}).get("params", []),
        })
    return {"suite": suite, "data": data, "rows": len(df), "parameters": parameters, "id_column": id_column,
            "success": bool(result["success"]), "results": results}


def raise_on_failure(reports: list[dict]) -> None:
    failed = [r for r in reports if not r["success"]]
    if failed:
        raise ValidationFailed(failed)
