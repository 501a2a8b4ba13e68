"""RunDir: a run folder's paths, a bare SAE directory standing in for a run, and the one error for neither."""

from __future__ import annotations

import pytest

from saelab.errors import SAEFileError
from saelab.rundir import NOT_A_RUN, RunDir


def test_a_run_folder_lays_out_every_stage(tmp_path):
    run = RunDir(tmp_path / "r")  # laid out before anything is written: training makes it
    assert not run.bare and run.sae == tmp_path / "r" / "sae"
    assert run.config == tmp_path / "r" / "config.yaml" and run.metrics == tmp_path / "r" / "metrics.jsonl"
    assert run.checkpoints == tmp_path / "r" / "checkpoints" and run.cache == tmp_path / "r" / "cache"
    assert run.eval == tmp_path / "r" / "eval" and run.dashboard == tmp_path / "r" / "dashboard"
    assert run.core == tmp_path / "r" / "eval" / "core.json"
    assert run.probing == tmp_path / "r" / "eval" / "probing.json"
    assert run.steering_scores == tmp_path / "r" / "eval" / "steering_scores.parquet"
    assert run.steer_sweep([3, 12]) == tmp_path / "r" / "eval" / "steer_sweep_3_12.json"
    assert run.patching == tmp_path / "r" / "eval" / "patching"
    assert RunDir.entries() == {"config.yaml", "metrics.jsonl", "sae", "checkpoints", "cache", "eval"}


def test_open_finds_the_sae_of_a_run_or_of_a_bare_sae_directory(tmp_path):
    (tmp_path / "run" / "sae").mkdir(parents=True)
    (tmp_path / "run" / "sae" / "cfg.json").write_text("{}")
    run = RunDir.open(str(tmp_path / "run"))
    assert not run.bare and run.sae == tmp_path / "run" / "sae" and run.eval == tmp_path / "run" / "eval"
    assert RunDir.is_run(tmp_path / "run") and RunDir.is_sae(run.sae) and not RunDir.is_sae(run.path)

    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "cfg.json").write_text("{}")
    bare = RunDir.open(tmp_path / "bare")
    assert bare.bare and bare.sae == tmp_path / "bare"  # its eval/ and dashboard/ go inside it
    assert bare.eval == tmp_path / "bare" / "eval" and bare.dashboard == tmp_path / "bare" / "dashboard"
    assert not RunDir.is_run(tmp_path / "bare")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "metrics.jsonl").write_text("")
    assert RunDir.is_run(tmp_path / "training")  # its SAE is not saved yet


def test_open_names_what_is_wrong(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken" / "sae").mkdir(parents=True)  # sae/ without cfg.json: not an SAE
    for name in ("empty", "broken"):
        with pytest.raises(SAEFileError) as e:
            RunDir.open(tmp_path / name, hint="make one")
        assert e.value.message == f"{tmp_path / name}: {NOT_A_RUN}" and e.value.hint == "make one"
    with pytest.raises(SAEFileError) as e:
        RunDir.open(tmp_path / "nope", missing="no such file or directory", file="a file")
    assert e.value.message == f"{tmp_path / 'nope'}: no such file or directory"
    with pytest.raises(SAEFileError) as e:
        RunDir.open(tmp_path / "notes.txt", missing="no such file or directory", file="a file")
    assert e.value.message == f"{tmp_path / 'notes.txt'}: a file"
    with pytest.raises(SAEFileError, match="neither a run directory"):
        RunDir.open(tmp_path / "nope")
