"""Many SAEs from one pass: each SAE of a sweep is bit-identical to the same SAE trained alone on the same batches,
a sweep killed (even between two SAEs' checkpoint saves) and resumed equals the uninterrupted one, and the
`saelab train --sweep` file gives each SAE its own run folder."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import DiesAfter, Interrupted, planted_data, small_cfg

from saelab.activations.in_memory import InMemoryActivations
from saelab.config import SAEConfig
from saelab.training import train
from saelab.training.trainer import SAERun, train_many

# two SAEs that draw random numbers (Matryoshka's sampled prefixes): each must get its own stream, as alone
SAES = {
    "topk-k4": SAEConfig(n_latents=128, k=4),
    "batchtopk-k8": SAEConfig(n_latents=96, k=8, architecture="batchtopk", options={"calibration_tokens": 1024}),
    "mat-a": SAEConfig(n_latents=128, k=4, architecture="matryoshka", options={"random_prefixes": 3}),
    "mat-b": SAEConfig(n_latents=64, k=6, architecture="matryoshka", options={"random_prefixes": 2}),
}
DEAD = dict(dead_tokens=256 * 8)  # latents die within the run: AuxK and the dead counters are exercised


def sweep_cfgs(**kw):
    return [small_cfg(sae=sae, **DEAD, **kw) for sae in SAES.values()]


def weights(run_dir):
    return load_file(str(run_dir / "sae" / "sae_weights.safetensors"))


def fvus(run_dir):
    return [json.loads(line)["fvu"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_sae(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), (a.name, name)
    assert fvus(a) == fvus(b)
    info_a, info_b = (json.loads((d / "sae" / "saelab.json").read_text())["training"] for d in (a, b))
    assert info_a["calibration"] == info_b["calibration"] and info_a["dead_latents"] == info_b["dead_latents"]


def test_each_sae_of_a_sweep_equals_it_trained_alone(tmp_path):
    x = planted_data(n_rows=4096)
    results = train_many(sweep_cfgs(), [tmp_path / "sweep" / n for n in SAES], InMemoryActivations(x, 256, seed=3),
                         progress=False)
    for name, cfg, res in zip(SAES, sweep_cfgs(), results):
        alone = train(cfg, InMemoryActivations(x, 256, seed=3), tmp_path / "alone" / name, progress=False)
        assert_same_sae(tmp_path / "sweep" / name, tmp_path / "alone" / name)
        for key, value in alone.sae.state_dict().items():
            assert torch.equal(value, res.sae.state_dict()[key]), (name, key)
        assert (tmp_path / "sweep" / name / "config.yaml").exists()
    # the SAEs did differ (the comparison is not of one SAE with itself)
    assert not torch.equal(results[2].sae.W_dec, results[0].sae.W_dec)


def test_a_killed_sweep_resumes_to_the_uninterrupted_one(tmp_path):
    x = planted_data(n_rows=4096)
    dirs = lambda root: [tmp_path / root / n for n in SAES]  # noqa: E731
    train_many(sweep_cfgs(), dirs("a"), InMemoryActivations(x, 256, seed=3), progress=False)
    with pytest.raises(Interrupted):  # killed at step 47: checkpoints at 20 and 40
        train_many(sweep_cfgs(), dirs("b"), DiesAfter(x, 256, seed=3, n=47), progress=False)
    assert not any((d / "sae").exists() for d in dirs("b"))
    train_many(sweep_cfgs(resume=True), dirs("b"), InMemoryActivations(x, 256, seed=3), progress=False)
    for a, b in zip(dirs("a"), dirs("b")):
        assert_same_sae(a, b)


def test_a_kill_between_two_saves_resumes_from_the_common_checkpoint(tmp_path, monkeypatch):
    """Killed while the third SAE writes its step-40 checkpoint: the first two hold step 40, the others only 20
    (older checkpoints are pruned only once every SAE has saved); all restart from 20, losing nothing."""
    x = planted_data(n_rows=4096)
    dirs = lambda root: [tmp_path / root / n for n in SAES]  # noqa: E731
    train_many(sweep_cfgs(keep_checkpoints=1), dirs("a"), InMemoryActivations(x, 256, seed=3), progress=False)

    real_save = SAERun.save

    def dies_at_40(self, step, cursors):
        if step == 40 and self.run_dir.name == "mat-a":
            raise Interrupted
        real_save(self, step, cursors)

    monkeypatch.setattr(SAERun, "save", dies_at_40)
    with pytest.raises(Interrupted):
        train_many(sweep_cfgs(keep_checkpoints=1), dirs("b"), InMemoryActivations(x, 256, seed=3), progress=False)
    monkeypatch.setattr(SAERun, "save", real_save)
    held = [sorted(p.name for p in (d / "checkpoints").glob("step-*")) for d in dirs("b")]
    assert held == [["step-00000020", "step-00000040"]] * 2 + [["step-00000020"]] * 2
    train_many(sweep_cfgs(keep_checkpoints=1, resume=True), dirs("b"), InMemoryActivations(x, 256, seed=3),
               progress=False)
    for a, b in zip(dirs("a"), dirs("b")):
        assert_same_sae(a, b)
        assert sorted(p.name for p in (b / "checkpoints").glob("step-*")) == ["step-00000060"]


# ------------------------------------------------------------------------------------------------ the command
T = 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory, reference_model):
    from saelab.activations import write_cache
    from saelab.config import CacheConfig

    root = tmp_path_factory.mktemp("sweep-cache")
    return write_cache(CacheConfig(hooks=["blocks.2.hook_resid_pre"], out=str(root / "cache"), tokens=64 * T,
                                   context_size=T, batch_rows=8), progress=False, model=reference_model)


def test_the_sweep_command_gives_each_sae_the_run_it_would_get_alone(cache, tmp_path, capsys):
    import yaml

    from saelab.cli import main

    sweep = {"cache": str(cache), "tokens": 64 * 12, "batch_size": 64, "eval_tokens": 0, "checkpoint_every": 5,
             "out": str(tmp_path / "sweep"),
             "saes": [{"name": "wide", "sae": {"n_latents": 256, "k": 8}},
                      {"sae": {"architecture": "batchtopk", "k": 4, "n_latents": 128}, "lr": 0.001}]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["train", "--sweep", str(tmp_path / "sweep.yaml"), "--no-progress", "--seed", "2"]) == 0
    lone = {"wide": ["--n-latents", "256", "--k", "8"],
            "batchtopk-k4": ["--arch", "batchtopk", "--k", "4", "--n-latents", "128", "--lr", "0.001"]}
    for name, flags in lone.items():
        assert main(["train", "--cache", str(cache), "--tokens", str(64 * 12), "--batch-size", "64", "--eval-tokens",
                     "0", "--seed", "2", "--checkpoint-every", "5", "--out", str(tmp_path / name), "--no-progress",
                     *flags]) == 0
        assert_same_sae(tmp_path / "sweep" / name, tmp_path / name)
        assert sorted(p.name for p in (tmp_path / "sweep" / name).iterdir()) == \
            ["checkpoints", "config.yaml", "metrics.jsonl", "sae"]
    out = capsys.readouterr().out
    assert f"trained {tmp_path / 'sweep' / 'wide'}/sae: 12 steps" in out

    import saelab  # the notebook API takes the same file; keywords set the shared settings

    runs = saelab.train(sweep=tmp_path / "sweep.yaml", out=str(tmp_path / "api"), seed=2, progress=False)
    assert [r.path.name for r in runs] == ["wide", "batchtopk-k4"]
    for r in runs:
        assert_same_sae(r.path, tmp_path / r.path.name)
