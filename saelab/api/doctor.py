"""`saelab.doctor_report`: the environment a bug report needs and the sparse kernels' self-tests (`saelab doctor`)."""

from __future__ import annotations

from pathlib import Path


def doctor_report(json_path: str | Path | None = None) -> tuple[dict, Path | None]:
    """The environment a bug report needs and the sparse kernels' self-tests on every device, as `saelab doctor`
    runs them (see `saelab.doctor`): (the report, its JSON file when `json_path` is given; the path is checked before
    the self-tests run). report["ok"]: every check passed; `saelab.doctor.format_report` gives its text.

    >>> report, _ = saelab.doctor_report(); report["ok"]                       # doctest: +SKIP
    """
    from saelab.doctor import check_json_path, collect, write_json

    if json_path is not None:
        check_json_path(json_path)  # before the self-tests, so a bad path fails at once
    report = collect()
    return report, write_json(report, json_path) if json_path is not None else None
