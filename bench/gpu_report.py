"""The two small Python pieces of `bench/gpu.sh`: the environment line it starts with, and the final JSON.

    python bench/gpu_report.py env                                   # JSON: python, torch, CUDA device, triton, git
    python bench/gpu_report.py assemble STEPS.tsv ENV.json OUT [--dry-run] [--started UNIX_TIME]

OUT is a file, or a folder that gets gpu-<device>-<date>.json (gpu-dryrun-<device>-<date>.json for a dry run;
never overwriting an earlier one). `assemble` reads gpu.sh's step table (one tab-separated line a step: name,
status, exit code, seconds, limit, log, result path, note, command) and writes one JSON with a section per step:
its status, seconds, the JSON the step wrote (or, for a training run folder, its last logged metrics and core
evaluation; for a text file, its lines) and the tail of its output. --started: gpu.sh's start, for the wall time.
"""

from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

TAIL_OK, TAIL_FAILED = 3000, 8000  # characters of a step's output kept in the report
PASSED = ("ok", "absent")  # absent: `saelab doctor` before that command exists
FIELDS = ("name", "status", "rc", "seconds", "limit_s", "log", "result", "note", "command")


def environment() -> dict:
    """What ran the check: enough to read its numbers (and to name its file) without `saelab doctor`."""
    env = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        env["git_commit"] = None
    try:
        import torch

        env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            env.update(device_name=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                       capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                       memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1))
    except Exception as e:  # noqa: BLE001 - a report of a broken install is still a report
        env["torch_error"] = repr(e)
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton_error"] = repr(e)[:300]
    return env


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (for the file name)."""
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-").split("-")
    return "-".join(w for w in words if w not in ("nvidia", "tesla")) or "unknown"


def _tail(path: str, limit: int) -> str:
    """The end of a log, with progress-bar redraws (carriage returns) collapsed to their last state."""
    try:
        text = Path(path).read_bytes().decode("utf-8", "replace")  # bytes: read_text would turn each \r into \n
    except OSError:
        return ""
    lines = (([piece for piece in line.split("\r") if piece.strip()] or [""])[-1] for line in text.split("\n"))
    return "\n".join(lines).rstrip()[-limit:]


def _result(path: str):
    """A step's result: a JSON file, a training run folder (its last metrics line and eval/core.json), or the
    lines of a text file (the compile check's one line per kernel variant)."""
    p = Path(path)
    try:
        if p.is_dir():
            lines = (p / "metrics.jsonl").read_text().splitlines() if (p / "metrics.jsonl").exists() else []
            core = p / "eval" / "core.json"
            return {"metrics_logged": len(lines), "last_metrics": json.loads(lines[-1]) if lines else None,
                    "core": json.loads(core.read_text()) if core.exists() else None}
        if p.suffix == ".json":
            return json.loads(p.read_text())
        return p.read_text(errors="replace").splitlines()
    except (OSError, ValueError) as e:
        return {"unreadable": f"{path}: {e}"}


def report_path(out: str, env: dict, dry_run: bool) -> Path:
    """OUT itself, or a new gpu-<device>-<date>.json in the folder OUT."""
    path = Path(out)
    if not path.is_dir():
        return path
    stem = f"gpu-{'dryrun-' if dry_run else ''}{slug(env.get('device_name') or 'cpu')}-{datetime.date.today()}"
    candidates = (path / (stem + (f"-{i}" if i else "") + ".json") for i in range(1000))
    return next(c for c in candidates if not c.exists())


def assemble(steps_tsv: str, env_json: str, out: str, dry_run: bool,
             started: float | None = None) -> tuple[Path, dict]:
    steps = {}
    for line in Path(steps_tsv).read_text().splitlines():
        row = dict(zip(FIELDS, line.split("\t")))
        section = {"status": row["status"], "exit_code": int(row["rc"]) if row["rc"].lstrip("-").isdigit() else None,
                   "seconds": round(float(row["seconds"]), 1), "limit_s": int(row["limit_s"]),
                   "command": row["command"]}
        if row["note"]:
            section["note"] = row["note"]
        if row["result"] and Path(row["result"]).exists():
            section["result"] = _result(row["result"])
        if row["log"]:
            section["output_tail"] = _tail(row["log"], TAIL_OK if row["status"] == "ok" else TAIL_FAILED)
        steps[row["name"]] = section
    try:
        env = json.loads(Path(env_json).read_text())
    except (OSError, ValueError) as e:
        env = {"unreadable": str(e)}
    report = {"check": "bench/gpu.sh", "dry_run": dry_run,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": env, "ok": all(s["status"] in PASSED for s in steps.values()),
              "steps_seconds": round(sum(s["seconds"] for s in steps.values()), 1),
              "wall_seconds": round(time.time() - started, 1) if started else None,
              "summary": {name: s["status"] for name, s in steps.items()}, "steps": steps}
    path = report_path(out, env, dry_run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path, report


def main(argv: list[str]) -> int:
    if argv[:1] == ["env"]:
        print(json.dumps(environment()))
        return 0
    if argv[:1] == ["assemble"] and len(argv) >= 4:
        flags = argv[4:]
        started = float(flags[flags.index("--started") + 1]) if "--started" in flags else None
        path, report = assemble(*argv[1:4], dry_run="--dry-run" in flags, started=started)
        width = max(map(len, report["summary"]))
        for name, s in report["steps"].items():
            note = f"  ({s['note']})" if "note" in s else ""
            print(f"  {name:{width}}  {s['status']:8} {s['seconds']:7.1f} s{note}")
        print(f"{'all steps passed' if report['ok'] else 'SOME STEPS DID NOT PASS'}; "
              f"{report['wall_seconds'] or report['steps_seconds']:.0f} s; wrote {path}")
        return 0 if report["ok"] else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
