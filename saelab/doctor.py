"""`saelab doctor`: the environment a bug report needs, and whether the sparse kernels work on this machine.

`collect()` gathers one report (a plain dict, written as JSON by `--json`): versions (Python, saelab, torch and its
CUDA build, triton, TransformerLens, transformers, the NVIDIA driver), devices, for every device and dtype the
kernel path `auto` would take with both paths' self-tests run there (`saelab.kernels.selftest`), the Hugging Face
model cache and the embedded reference model. `checks` lists what passed and what failed; the report is `ok` when
every check passed. `format_report` prints it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import torch

from saelab.errors import ConfigError
from saelab.files import write_text_atomic

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
PACKAGES = ("saelab", "torch", "triton", "transformer-lens", "transformers", "huggingface-hub", "numpy")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    """The NVIDIA driver's version (nvidia-smi), else the CUDA version the driver supports (from torch)."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get is not None and torch.version.cuda:
        try:
            v = int(get())
            return f"supports CUDA {v // 1000}.{v % 1000 // 10}" if v else None
        except Exception:  # noqa: BLE001 -- no driver at all
            return None
    return None


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    out.update({p: _version(p) for p in PACKAGES})
    out["torch_cuda_build"] = torch.version.cuda
    out["nvidia_driver"] = _driver() if torch.version.cuda else None
    return out


def _cpu_name() -> str:
    try:  # Linux names the model here; platform.processor() is often empty there
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def devices() -> tuple[list[dict], str]:
    """Every device torch can use, and why CUDA cannot be used ('' when it can, or torch has no CUDA build)."""
    found = [{"device": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}]
    with warnings.catch_warnings(record=True) as caught:  # torch explains a failed CUDA start in a warning
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()
    why = ""
    if torch.version.cuda and not usable:
        why = "; ".join(str(w.message).strip() for w in caught) or "torch.cuda.is_available() is False"
    for i in range(torch.cuda.device_count() if usable else 0):
        p = torch.cuda.get_device_properties(i)
        found.append({"device": f"cuda:{i}", "name": p.name, "capability": f"sm_{p.major}{p.minor}",
                      "memory_gib": round(p.total_memory / 2 ** 30, 1)})
    return found, why


def _kernel_row(device: str, dtype: torch.dtype) -> dict:
    """The path `auto` (or SAELAB_KERNELS) takes for `dtype` tensors on `device`, and both paths' self-tests."""
    from saelab.kernels import backend, selftest, torch_ops

    name = str(dtype).removeprefix("torch.")
    row = {"device": device, "dtype": name, "backend": None, "error": "",
           "torch": selftest.run(torch_ops, "torch", device, dtype).to_dict(), "triton": None}
    probe = torch.empty(0, device=device, dtype=dtype)
    with warnings.catch_warnings():  # the report says what the fallback warning would
        warnings.simplefilter("ignore", backend.KernelFallbackWarning)
        try:
            row["backend"] = backend.backend_for(probe)
        except (ConfigError, RuntimeError) as e:  # SAELAB_KERNELS=triton where Triton cannot serve
            row["error"] = str(e) + (f" (hint: {e.hint})" if getattr(e, "hint", "") else "")
    considered = dtype in backend.TRITON_DTYPES and backend.triton_available() and (
        device.startswith("cuda") or row["backend"] == "triton")
    if considered:
        row["triton"] = backend.self_test(device, dtype).to_dict()
    return row


def kernels(device_names: list[str]) -> dict:
    from saelab.kernels import backend

    env = os.environ.get(backend.ENV_VAR, "")
    try:
        backend.forced_backend()
        env_error = ""
    except ConfigError as e:
        env_error = str(e)
    rows = [] if env_error else [_kernel_row(d, dt) for d in device_names for dt in DTYPES]
    interpreted = None
    if backend.triton_available() and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        from saelab.kernels import triton_kernels

        interpreted = triton_kernels.INTERPRETED
    return {"SAELAB_KERNELS": env or "(unset: auto)", "env_error": env_error,
            "triton_importable": backend.triton_available(), "triton_interpreter": interpreted, "rows": rows}


def models() -> dict:
    from huggingface_hub import constants

    from saelab.errors import ModelError
    from saelab.models.loading import REFERENCE, check_model_dir, reference_dir, resolve_model_path

    cache = Path(constants.HF_HUB_CACHE)
    cached = sorted(p.name.removeprefix("models--").replace("--", "/") for p in cache.glob("models--*")) \
        if cache.is_dir() else []
    ref = reference_dir()
    try:
        check_model_dir(REFERENCE, Path(resolve_model_path(REFERENCE)))  # its weights, then config and tokenizer
        ref_error = ""
    except ModelError as e:
        ref_error = str(e)
    weights = ref / "model.safetensors"
    return {"hf_cache": str(cache), "hf_cache_exists": cache.is_dir(), "hf_cached_models": cached,
            "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE", ""), "reference_dir": str(ref),
            "reference_present": not ref_error, "reference_error": ref_error,
            "reference_weights_mb": round(weights.stat().st_size / 1e6, 1) if weights.is_file() else None}


def _checks(report: dict) -> list[dict]:
    """Each check: name, ok, detail (what failed, or what passed)."""
    out = []

    def add(name: str, ok: bool, detail: str = "") -> None:
        out.append({"name": name, "ok": bool(ok), "detail": detail})

    k = report["kernels"]
    if k["env_error"]:
        add("SAELAB_KERNELS", False, k["env_error"])
    cuda = [d["device"] for d in report["devices"] if d["device"].startswith("cuda")]
    if cuda and sys.platform.startswith("linux"):
        add("triton imports (the fast kernel path on CUDA)", k["triton_importable"],
            "" if k["triton_importable"] else "CUDA tensors take the slower PyTorch path; pip install triton")
    if report["cuda_unusable"]:
        add("CUDA usable", False, report["cuda_unusable"])
    for row in k["rows"]:
        where = f"{row['device']} {row['dtype']}"
        if row["error"]:
            add(f"kernel path on {where}", False, row["error"])
        for path in ("torch", "triton"):
            t = row[path]
            if t is not None:
                add(f"{path} kernels on {where}", t["ok"], t["failure"] or f"passed in {t['seconds']:.2f} s")
    m = report["models"]
    add("embedded reference model", m["reference_present"], m["reference_error"] or m["reference_dir"])
    return out


def collect() -> dict:
    """The whole report (see the module docstring); runs the kernels' self-tests on every device."""
    found, unusable = devices()
    report = {"versions": versions(), "devices": found, "cuda_unusable": unusable,
              "kernels": kernels([d["device"] for d in found]), "models": models()}
    report["checks"] = _checks(report)
    report["ok"] = all(c["ok"] for c in report["checks"])
    return report


def _self_test_text(t: dict | None) -> str:
    if t is None:
        return "-"
    return f"ok ({t['seconds']:.2f} s)" if t["ok"] else f"FAILED: {t['failure']}"


def format_report(report: dict) -> str:
    v, k, m = report["versions"], report["kernels"], report["models"]
    lines = ["versions"]
    for key in ("python", "platform", *PACKAGES):
        lines.append(f"  {key:18} {v[key] or 'not installed'}")
    lines.append(f"  {'torch CUDA build':18} {v['torch_cuda_build'] or 'none (CPU-only torch)'}")
    if v["torch_cuda_build"]:
        lines.append(f"  {'NVIDIA driver':18} {v['nvidia_driver'] or 'not found'}")
    lines.append("devices")
    for d in report["devices"]:
        extra = f", {d['capability']}, {d['memory_gib']} GiB" if "capability" in d else f", {d['threads']} threads"
        lines.append(f"  {d['device']:18} {d['name']}{extra}")
    if report["cuda_unusable"]:
        lines.append(f"  {'cuda':18} unusable: {report['cuda_unusable']}")
    lines.append(f"kernels (SAELAB_KERNELS={k['SAELAB_KERNELS']}; triton "
                 f"{'imports' if k['triton_importable'] else 'does not import'}"
                 f"{'; interpreter' if k['triton_interpreter'] else ''})")
    if k["env_error"]:
        lines.append(f"  error: {k['env_error']}")
    if k["rows"]:
        lines.append(f"  {'device':8} {'dtype':9} {'path':7} {'torch self-test':22} triton self-test")
    for row in k["rows"]:
        path = row["backend"] or "error"
        lines.append(f"  {row['device']:8} {row['dtype']:9} {path:7} {_self_test_text(row['torch']):22} "
                     f"{_self_test_text(row['triton'])}")
        if row["error"]:
            lines.append(f"    error: {row['error']}")
    lines.append("models")
    cached = ", ".join(m["hf_cached_models"][:8]) + (" …" if len(m["hf_cached_models"]) > 8 else "")
    lines.append(f"  {'HF cache':18} {m['hf_cache']} ({'exists' if m['hf_cache_exists'] else 'not created yet'}"
                 f"{'; ' + cached if cached else ''})")
    ref = (f"present ({m['reference_weights_mb']} MB of weights) in {m['reference_dir']}" if m["reference_present"]
           else f"MISSING: {m['reference_error']}")
    lines.append(f"  {'reference model':18} {ref}")
    failed = [c for c in report["checks"] if not c["ok"]]
    lines.append(f"checks: all {len(report['checks'])} passed" if not failed else
                 f"checks: {len(failed)} of {len(report['checks'])} FAILED")
    lines += [f"  FAILED {c['name']}: {c['detail']}" for c in failed]
    return "\n".join(lines)


def check_json_path(path: str | Path) -> Path:
    """Where `--json` will write, checked before the report is collected."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--json {str(path)!r} is a directory", hint="give a file name, e.g. doctor.json")
    if not p.parent.is_dir():
        raise ConfigError(f"--json {str(path)!r}: the folder {str(p.parent)!r} does not exist",
                          hint="create it first, or write the file somewhere else")
    return p


def write_json(report: dict, path: str | Path) -> Path:
    """Write `report` to `path` crash-safely (no half-written file)."""
    return write_text_atomic(check_json_path(path), json.dumps(report, indent=2) + "\n")
