"""Settings declared once (`saelab.settings`): the flags, help texts and keyword settings generated from the config
dataclasses, counts, and the one hook field."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field

import pytest

from saelab.config import CacheConfig, ModelSpec, SAEConfig, TrainConfig, from_dict, load_config, save_config
from saelab.errors import ConfigError
from saelab.settings import (add_flags, as_count, flags, overrides_from_args, overrides_from_kwargs, parse_count,
                             setting)


@pytest.mark.parametrize("text, n", [("20M", 20_000_000), ("500k", 500_000), ("1.5G", 1_500_000_000), ("4096", 4096),
                                     ("2e6", 2_000_000), ("64_000", 64_000), (" 3K ", 3000), ("2b", 2_000_000_000)])
def test_parse_count(text, n):
    assert parse_count(text) == n


def test_a_bad_count_is_a_config_error_and_a_one_line_usage_error(capsys):
    with pytest.raises(ConfigError, match=r"^not a count: 'lots' \(use e.g. 20M, 500k or 4096\)$"):
        parse_count("lots")
    with pytest.raises(ConfigError, match=r"^tokens: not a count: 'lots'"):
        as_count("lots", "tokens")
    assert as_count(7, "tokens") == 7 and as_count("7k", "tokens") == 7000
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--tokens", type=parse_count)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--tokens", "lots"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "x: error: argument --tokens: not a count: 'lots' (use e.g. 20M, 500k or 4096)"


@dataclass
class Inner:
    name: str = setting("ref", "the model", flag="--model")
    hidden: int = 3  # no setting: no flag


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    tokens: int = setting(2_000_000, "training tokens", parse=parse_count)
    fractions: list = setting([0.5, 0.5], "fractions")
    exclude_bos: bool = setting(True, "keep BOS", flag="--keep-bos", negate=True)
    resume: bool = setting(False, "resume")
    lr: float = setting(0.0, "learning rate", default_text="2e-4 / sqrt(n / 2^14)")
    share: float = setting(0.5, "50% of it")


def test_flags_follow_the_declaration():
    got = [(f.key, f.name, f.option) for f in flags(Outer)]
    assert got == [("inner.name", "model", "--model"), ("tokens", "tokens", "--tokens"),
                   ("fractions", "fractions", "--fractions"), ("exclude_bos", "exclude_bos", "--keep-bos"),
                   ("resume", "resume", "--resume"), ("lr", "lr", "--lr"), ("share", "share", "--share")]
    assert Outer().fractions == [0.5, 0.5] and Outer().fractions is not Outer().fractions  # a fresh list each


def test_generated_flags_parse_like_the_api_reads_keywords():
    p = argparse.ArgumentParser(prog="x")
    add_flags(p, Outer)
    assert vars(p.parse_args([])) == {"model": None, "tokens": None, "fractions": None, "exclude_bos": None,
                                      "resume": None, "lr": None, "share": None}  # a --config file is not overridden
    args = p.parse_args(["--tokens", "2M", "--keep-bos", "--model", "m", "--resume", "--lr", "1e-3"])
    want = {"inner.name": "m", "tokens": 2_000_000, "exclude_bos": False, "resume": True, "lr": 1e-3}
    assert overrides_from_args(args, Outer) == want
    assert overrides_from_kwargs(Outer, {"model": "m", "tokens": "2M", "exclude_bos": False, "resume": True,
                                         "lr": 1e-3, "share": None}, "f") == want
    with pytest.raises(ConfigError, match="f: unknown setting 'hidden'") as e:
        overrides_from_kwargs(Outer, {"hidden": 4}, "f")
    assert e.value.hint == "use one of exclude_bos, fractions, lr, model, resume, share, tokens"
    with_defaults = argparse.ArgumentParser()
    add_flags(with_defaults, Outer, defaults=True)
    assert vars(with_defaults.parse_args([])) == {"model": "ref", "tokens": 2_000_000, "fractions": [0.5, 0.5],
                                                  "exclude_bos": True, "resume": False, "lr": 0.0, "share": 0.5}


def test_help_states_each_default_once():
    p = argparse.ArgumentParser(prog="x")
    add_flags(p, Outer)
    text = " ".join(p.format_help().split())
    for piece in ("--model MODEL the model (default ref)", "--tokens TOKENS training tokens (default 2M)",
                  "--keep-bos keep BOS --resume resume", "learning rate (default 2e-4 / sqrt(n / 2^14))",
                  "50% of it (default 0.5)"):
        assert piece in text, text


@pytest.mark.parametrize("argv, cls", [(["train", "--help"], TrainConfig), (["cache", "--help"], CacheConfig)])
def test_every_setting_is_a_flag_whose_help_states_its_default_once(capsys, argv, cls):
    from saelab.cli import main

    with pytest.raises(SystemExit):
        main(argv)
    text = capsys.readouterr().out
    for f in flags(cls):
        entry = re.search(rf"^  {re.escape(f.option)}\b(.*?)(?=^  -|^\S|\Z)", text, re.S | re.M)
        assert entry, f.option
        body = " ".join(entry.group(1).split())
        if f.type is bool:  # a switch: on or off, no default to state
            assert "(default" not in body, body
        else:
            assert body.count("(default ") == 1 and body.endswith(")"), body


def test_arch_help_lists_the_registered_architectures(capsys):
    from saelab.cli import main
    from saelab.sae.architectures import registry

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    trainable = [name for name, arch in registry().items() if arch.trainable]
    assert f"--arch ARCH {', '.join(trainable[:-1])} or {trainable[-1]};" in text


def test_mp_help_shows_its_description_and_only_its_options(capsys):
    from saelab.cli import main
    from saelab.sae.architectures import get_architecture, registry
    from saelab.settings import flags as settings_of

    with pytest.raises(SystemExit) as e:
        main(["train", "--arch", "mp", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    mp = get_architecture("mp")
    assert f"mp: {mp.help}" in " ".join(text.split())
    others = {f.option for name, a in registry().items() if name != "mp" for f in settings_of(a.Options)}
    mine = {f.option for f in settings_of(mp.Options)}
    assert mine and all(opt in text for opt in mine)
    assert not [opt for opt in others - mine if re.search(rf"{re.escape(opt)}(?![\w-])", text)]
    assert "--tokens" in text and "--hook" in text  # the command's own flags are all there


def test_cli_and_api_give_the_same_config():
    """`saelab train FLAGS` and `saelab.train(KEYWORDS)` read the same declaration: the same overrides."""
    from saelab.cli import build_parser
    from saelab.cli.train import _settings

    args = build_parser().parse_args(["train", "--hook", "blocks.1.hook_resid_post", "--tokens", "1M", "--k", "8",
                                      "--arch", "batchtopk", "--dataset", "d", "--model-dtype", "bfloat16",
                                      "--threshold-momentum", "0.9", "--resume"])
    kw = _settings(args)
    assert kw == {"hook": "blocks.1.hook_resid_post", "tokens": 1_000_000, "k": 8, "arch": "batchtopk",
                  "dataset": "d", "model_dtype": "bfloat16", "threshold_momentum": "0.9", "resume": True}
    kw.pop("threshold_momentum")
    overrides = overrides_from_kwargs(TrainConfig, kw, "t")
    assert overrides == {"sae.hook_name": "blocks.1.hook_resid_post", "tokens": 1_000_000, "sae.k": 8,
                         "sae.architecture": "batchtopk", "corpus.source": "d", "model.dtype": "bfloat16",
                         "resume": True}
    cfg = load_config(TrainConfig, None, overrides)
    assert cfg.sae.hook_name == "blocks.1.hook_resid_post" and cfg.model.dtype == "bfloat16" and cfg.resume


def test_one_hook_field_and_older_configs_with_a_top_level_hook(tmp_path):
    assert "hook_name" not in {f.name for f in dataclasses.fields(TrainConfig)}
    old = tmp_path / "config.yaml"
    old.write_text("hook_name: blocks.1.hook_resid_pre\ntokens: 1000\nsae:\n  k: 4\n")
    cfg = load_config(TrainConfig, old)
    assert cfg.sae.hook_name == "blocks.1.hook_resid_pre" and cfg.sae.k == 4 and cfg.tokens == 1000
    # a flag (--hook) overrides the file's older key, as it overrode it before
    assert load_config(TrainConfig, old, {"sae.hook_name": "h2"}).sae.hook_name == "h2"
    with pytest.raises(ConfigError, match=r"sae.hook_name: 'a', but hook_name is 'b'"):
        from_dict(TrainConfig, {"hook_name": "b", "sae": {"hook_name": "a"}})
    save_config(cfg, tmp_path / "again.yaml")
    assert "hook_name: blocks.1.hook_resid_pre" in (tmp_path / "again.yaml").read_text()
    assert load_config(TrainConfig, tmp_path / "again.yaml") == cfg


def test_load_config_takes_a_built_config_too():
    base = CacheConfig(tokens=5000, hooks=["a"])
    cfg = load_config(CacheConfig, base, {"tokens": 7000, "model.name": "m"})
    assert cfg.tokens == 7000 and cfg.hooks == ["a"] and cfg.model == ModelSpec(name="m") and base.tokens == 5000


def test_options_are_checked_when_the_sae_config_is_built():
    with pytest.raises(ConfigError, match=r"^sae\.options\[topk\]\.beta: unknown field"):
        SAEConfig(architecture="topk", options={"beta": 1.0})
    assert SAEConfig(architecture="mp").options["tol"] == 0.0  # complete, defaults filled in
