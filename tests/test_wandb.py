"""Experiment tracking: `--wandb PROJECT` (and `saelab.train(wandb=...)`) logs each SAE's config, the metrics stream
of metrics.jsonl and the closing core metrics to one wandb run per SAE. Checked on real offline runs
(WANDB_MODE=offline), read back from the run's `.wandb` transaction log."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from saelab.cli import main

HOOK = "blocks.2.hook_resid_pre"
T = 32


def wandb_records(path: Path):
    """The protobuf records of an offline run's `.wandb` file: a 7-byte header (":W&B", magic, version), then a
    LevelDB-style log of 32 KiB blocks, each record a 7-byte header (CRC, length, type) and a chunk; FULL = 1 and
    LAST = 4 close a record, a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_offline_run(run_dir: Path) -> dict:
    """name, group, project, config (top-level keys, JSON-decoded), history (rows without wandb's own _ keys) and
    the final summary of one offline run."""
    (log,) = run_dir.glob("run-*.wandb")
    out = {"history": [], "summary": {}, "config": {}}

    def items(updates):
        return {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates}

    for rec in wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(name=rec.run.display_name, group=rec.run.run_group, project=rec.run.project)
            out["config"].update(items(rec.run.config.update))
        elif kind == "config":
            out["config"].update(items(rec.config.update))
        elif kind == "history":
            out["history"].append({k: v for k, v in items(rec.history.item).items() if not k.startswith("_")
                                   or k == "_step"})
        elif kind == "summary":
            out["summary"].update(items(rec.summary.update))
    out["config"] = {k: v.get("value", v) if isinstance(v, dict) and set(v) <= {"value", "desc"} else v
                     for k, v in out["config"].items()}
    return out


def offline_runs(wandb_dir: Path) -> dict[str, dict]:
    """Every offline run under `wandb_dir`, by name, once wandb's service has written all it was given (a finished
    run's last records may still be on their way to disk until then)."""
    import wandb

    wandb.teardown()
    runs = [read_offline_run(d) for d in sorted((wandb_dir / "wandb").glob("offline-run-*"))]
    return {r["name"]: r for r in runs}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb writes to tmp_path/wandb, reaches for no server and leaves the console alone."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path),
                        "WANDB_CACHE_DIR": str(tmp_path), "WANDB_CONSOLE": "off", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    return tmp_path


def assert_history_is_the_metrics_stream(run: dict, run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 2 and len(run["history"]) == len(rows)
    for logged, row in zip(run["history"], rows):
        assert logged["_step"] == row["step"]
        assert {k[len("train/"):]: v for k, v in logged.items() if k != "_step"} == \
               {k: v for k, v in row.items() if k != "step"}


def test_a_sweep_logs_one_wandb_run_per_sae(offline, tmp_path):
    from test_train import planted_data, small_cfg

    from saelab.activations.in_memory import InMemoryActivations
    from saelab.config import SAEConfig
    from saelab.training.trainer import train_many

    saes = {"topk-k4": SAEConfig(n_latents=128, k=4),
            "batchtopk-k8": SAEConfig(n_latents=96, k=8, architecture="batchtopk",
                                      options={"calibration_tokens": 1024})}
    cfgs = [small_cfg(sae=sae, name=name, wandb="saelab-tests", tokens=256 * 25) for name, sae in saes.items()]
    results = train_many(cfgs, [tmp_path / "pareto" / n for n in saes],
                         InMemoryActivations(planted_data(n_rows=2048), 256, seed=3), progress=False)
    for i, result in enumerate(results):
        result.close_tracking({"fvu": 0.25 + i, "ce": {"clean": 3.0, "spliced": None}})
    runs = offline_runs(offline)
    assert set(runs) == set(saes)
    for (name, sae), result in zip(saes.items(), results):
        run = runs[name]
        assert run["project"] == "saelab-tests" and run["group"] == "pareto"
        assert run["config"]["sae"]["k"] == sae.k and run["config"]["sae"]["architecture"] == sae.architecture
        assert run["config"]["sae"]["d_in"] == result.sae.cfg.d_in and run["config"]["world_size"] == 1
        assert run["config"]["tokens"] == 256 * 25
        assert_history_is_the_metrics_stream(run, tmp_path / "pareto" / name)
        training = json.loads((tmp_path / "pareto" / name / "sae" / "saelab.json").read_text())["training"]
        assert run["summary"]["train/steps"] == training["steps"] == 25
        assert run["summary"]["train/dead_latents"] == training["dead_latents"]
    assert runs["topk-k4"]["summary"]["eval/fvu"] == 0.25 and runs["batchtopk-k8"]["summary"]["eval/fvu"] == 1.25
    assert runs["topk-k4"]["summary"]["eval/ce/clean"] == 3.0 and "eval/ce/spliced" not in runs["topk-k4"]["summary"]


@pytest.mark.slow
def test_saelab_train_wandb_logs_config_metrics_and_the_closing_evaluation(offline, tmp_path, reference_model,
                                                                           monkeypatch, capsys):
    from saelab.activations import write_cache
    from saelab.config import CacheConfig

    cache = write_cache(CacheConfig(hooks=[HOOK], out=str(tmp_path / "cache"), tokens=16 * T, context_size=T,
                                    batch_rows=4, shard_rows=8), progress=False, model=reference_model)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "tracked"
    assert main(["train", "--cache", str(cache), "--out", str(out), "--n-latents", "256", "--k", "8",
                 "--batch-size", "64", "--tokens", str(64 * 20), "--eval-tokens", "1k", "--no-progress",
                 "--wandb", "saelab-tests"]) == 0, capsys.readouterr().err
    (run,) = offline_runs(offline).values()
    assert run["name"] == "reference-blocks.2.hook_resid_pre-topk-k8" and run["project"] == "saelab-tests"
    assert run["config"]["cache"] == str(cache) and run["config"]["sae"]["n_latents"] == 256
    assert run["config"]["wandb"] == "saelab-tests"
    assert_history_is_the_metrics_stream(run, out)
    core = json.loads((out / "eval" / "core.json").read_text())
    logged = {k[len("eval/"):]: v for k, v in run["summary"].items() if k.startswith("eval/")}
    expected = {k: v for k, v in core.items() if v is not None and not isinstance(v, (list, dict))}
    assert expected and {k: logged[k] for k in expected} == expected
    assert "latent_density" not in logged  # per-latent arrays stay in core.json


def test_without_wandb_installed_the_flag_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    assert main(["train", "--tokens", "1k", "--wandb", "my-project"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "saelab train: error: --wandb: the wandb package is not installed"
    assert err[1].startswith("hint: pip install 'saelab[wandb]'") and len(err) == 2
    assert list(tmp_path.iterdir()) == []


def test_the_api_takes_wandb_as_the_flag_does(tmp_path, monkeypatch):
    import saelab
    from saelab.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="wandb package is not installed"):
        saelab.train(tokens="1k", wandb="my-project", progress=False)
    assert list(tmp_path.iterdir()) == []
