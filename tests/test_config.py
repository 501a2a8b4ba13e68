"""Config dataclasses: validated when built, loaded from YAML/JSON, overridden by (dotted) flags."""

import json

import pytest

from saelab.config import (ConfigError, ModelSpec, SAEConfig, TrainConfig, from_dict, load_config, merge, read_file,
                           save_config, to_dict)


def test_defaults_are_valid():
    cfg = TrainConfig()
    assert cfg.model == ModelSpec() and cfg.model.name == "reference"
    assert cfg.corpus.source == "stdlib"
    assert cfg.sae.architecture == "topk" and cfg.sae.k == 32 and cfg.sae.expansion_factor == 16
    sae = SAEConfig(d_in=8)
    assert sae.n_latents == 128 and sae.k_aux == 4  # filled in once d_in is known


@pytest.mark.parametrize("data, field", [
    ({"tokens": 0}, "tokens"),
    ({"batch_size": -1}, "batch_size"),
    ({"context_size": 1}, "context_size"),
    ({"source": "disk"}, "source"),
    ({"source": "cache"}, "cache"),
    ({"lr_decay_fraction": 1.5}, "lr_decay_fraction"),
    ({"adam_betas": [0.9, 1.0]}, "adam_betas"),
    ({"model": {"dtype": "float64"}}, "model.dtype"),
    ({"model": {"device": "tpu"}}, "model.device"),
    ({"model": {"name": ""}}, "model.name"),
    ({"sae": {"k": 0}}, "sae.k"),
    ({"sae": {"d_in": 8, "n_latents": 16, "k": 32}}, "sae.k"),
    ({"sae": {"architecture": "sparse_coding"}}, "sae.architecture"),
    ({"sae": {"normalize": "zscore"}}, "sae.normalize"),
    ({"sae": {"input_scale": float("nan")}}, "sae.input_scale"),
    ({"corpus": {"validation_per_mille": 2000}}, "corpus.validation_per_mille"),
    # wrong types are named too, instead of failing later with a TypeError deep inside
    ({"tokens": "lots"}, "tokens"),
    ({"sae": {"k": 3.5}}, "sae.k"),
    ({"resume": "maybe"}, "resume"),
    ({"model": {"name": 7}}, "model.name"),
])
def test_invalid_value_raises_one_config_error_naming_the_field(data, field):
    with pytest.raises(ConfigError) as info:
        from_dict(TrainConfig, data)
    msg = str(info.value)
    assert msg.startswith(f"{field}:"), msg


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"^tokenz: unknown field.*'tokens'"):
        from_dict(TrainConfig, {"tokenz": 5})
    with pytest.raises(ConfigError, match=r"^sae\.kk: unknown field in sae.*'k'"):
        from_dict(TrainConfig, {"sae": {"kk": 3}})
    with pytest.raises(ConfigError, match=r"^model\.dtyp: unknown field"):
        load_config(TrainConfig, None, {"model.dtyp": "float16"})


YAML = """\
model:
  name: reference
  dtype: float32
corpus:
  source: stdlib
  validation_per_mille: 100
sae:
  k: 16
  expansion_factor: 8
tokens: 2e6          # YAML 1.1 reads this as a string; it is still an int here
lr: 1e-4
adam_betas: [0.9, 0.95]
multi_topk_is_not_here: 1
"""


def test_load_yaml_and_json(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML.replace("multi_topk_is_not_here: 1\n", ""))
    cfg = load_config(TrainConfig, path)
    assert cfg.sae.k == 16 and cfg.sae.expansion_factor == 8 and cfg.corpus.validation_per_mille == 100
    assert cfg.tokens == 2_000_000 and isinstance(cfg.tokens, int)
    assert cfg.lr == 1e-4 and cfg.adam_betas == (0.9, 0.95)
    # unknown keys in a file are named
    bad = tmp_path / "bad.yaml"
    bad.write_text(YAML)
    with pytest.raises(ConfigError, match="multi_topk_is_not_here"):
        load_config(TrainConfig, bad)
    # JSON, and a round trip through both formats
    for suffix in (".json", ".yaml"):
        out = tmp_path / f"saved{suffix}"
        save_config(cfg, out)
        assert load_config(TrainConfig, out) == cfg
    (tmp_path / "j.json").write_text(json.dumps({"sae": {"k": 8}, "seed": 3, "wat": 1}))
    with pytest.raises(ConfigError, match="^wat: unknown field"):
        load_config(TrainConfig, tmp_path / "j.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="mapping"):
        read_file(tmp_path / "list.json")


def test_flag_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML.replace("multi_topk_is_not_here: 1\n", ""))
    overrides = {"sae.k": 64, "model.name": "gpt2", "tokens": None, "seed": 7, "corpus": {"source": "/data"}}
    cfg = load_config(TrainConfig, path, overrides)
    assert cfg.sae.k == 64 and cfg.model.name == "gpt2" and cfg.seed == 7
    assert cfg.sae.expansion_factor == 8  # the file's other nested values stay
    assert cfg.corpus.source == "/data" and cfg.corpus.validation_per_mille == 100  # nested dicts merge
    assert cfg.tokens == 2_000_000  # a None override (a flag not given) leaves the file's value
    # an invalid override is named like any other invalid value
    with pytest.raises(ConfigError, match=r"^sae\.k:"):
        load_config(TrainConfig, path, {"sae.k": -1})


def test_merge_does_not_touch_its_inputs():
    base = {"sae": {"k": 1, "d_in": 2}}
    out = merge(base, {"sae.k": 5})
    assert base == {"sae": {"k": 1, "d_in": 2}} and out == {"sae": {"k": 5, "d_in": 2}}
    assert to_dict(from_dict(TrainConfig, to_dict(TrainConfig()))) == to_dict(TrainConfig())
