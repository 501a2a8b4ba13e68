"""Evaluator scores found in a run folder, joined by latent id into one table (absent files are simply absent).

Looked for under RUN/eval/: `steering_scores.*` (steering input/output scores), `probing*.json` / `probing*.parquet`
(probe associations), `circuit*.json` / `circuit*.parquet` (circuit membership). Each file may be a table
(.parquet / .csv) or JSON holding per-latent records: a list of objects with a latent id field, such a list under
any top-level key, or an object keyed by latent id. Scalar fields become columns named `<file stem>.<field>`; a
latent listed in a circuit file, or listed with no scalar fields, gets `<file stem>.member = True`. A file with no
per-latent records is skipped and named in the manifest, not an error; a .json next to a .parquet of the same
name is that table's settings sidecar and is not read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from saelab.rundir import RunDir

LATENT_KEYS = ("latent", "latent_id", "feature", "feature_id", "index")
PATTERNS = ("steering_scores.*", "probing*.json", "probing*.parquet", "circuit*.json", "circuit*.parquet")


def _records_from_json(data) -> list[dict] | None:
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        if any(k in data[0] for k in LATENT_KEYS):
            return data
    if isinstance(data, dict):
        if data and all(str(k).lstrip("-").isdigit() for k in data):  # {"12": {...}} or {"12": 0.3}
            return [{"latent": int(k), **(v if isinstance(v, dict) else {"score": v})} for k, v in data.items()]
        for v in data.values():
            recs = _records_from_json(v)
            if recs:
                return recs
    return None


def _records(path: Path) -> list[dict] | None:
    if path.suffix == ".json":
        try:
            return _records_from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    if path.suffix in (".parquet", ".csv"):
        import pandas as pd

        try:
            df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        except Exception:  # a half-written or foreign file: skipped and reported, never fatal
            return None
        return df.to_dict("records")
    return None


def collect_scores(run: Path | None, n_latents: int):
    """(pandas DataFrame with a `latent` column and one column per score, or None; {"joined": [...],
    "skipped": [...]} for the manifest)."""
    import pandas as pd

    report = {"joined": [], "skipped": []}
    if run is None or not RunDir(run).eval.is_dir():
        return None, report
    table = None
    for pattern in PATTERNS:
        for path in sorted(RunDir(run).eval.glob(pattern)):
            if path.suffix == ".json" and path.with_suffix(".parquet").exists():
                continue  # the settings sidecar of a per-latent table (e.g. steering_scores.json)
            recs = _records(path)
            key = next((k for k in LATENT_KEYS if recs and k in recs[0]), None)
            if not recs or key is None:
                report["skipped"].append(path.name)
                continue
            rows = {}
            for r in recs:
                try:
                    lat = int(r[key])
                except (TypeError, ValueError, KeyError):
                    continue
                if not 0 <= lat < n_latents:
                    continue
                vals = {f"{path.stem}.{k}": _scalar(v) for k, v in r.items()
                        if k != key and isinstance(_scalar(v), (int, float, str, bool))}
                if path.name.startswith("circuit") or not vals:  # being listed is the membership
                    vals[f"{path.stem}.member"] = True
                rows.setdefault(lat, {}).update(vals)
            if not rows:
                report["skipped"].append(path.name)
                continue
            df = pd.DataFrame.from_dict(rows, orient="index")
            df.index.name = "latent"
            df = df.reset_index()
            table = df if table is None else table.merge(df, on="latent", how="outer")
            report["joined"].append(path.name)
    if table is not None:
        table["latent"] = table["latent"].astype(np.int64)
        table = table.sort_values("latent").reset_index(drop=True)
    return table, report


def _scalar(v):
    if isinstance(v, np.generic):
        return v.item()
    return v
