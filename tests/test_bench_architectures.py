"""bench/architectures.py's own logic without training: where each architecture sits on the L0 axis (its sweep
entries), merging a run's rows into a published result (--merge) and refusing one trained on other settings, the
printed tables and the Pareto figure's traces."""

import pytest
import yaml


@pytest.fixture(scope="module")
def ab(bench_module):
    return bench_module("architectures")


def _core(l0: float, delta_ce: float) -> dict:
    return {"explained_variance": 0.7, "delta_ce": delta_ce, "kl_sae": 1.0, "loss_recovered_zero": 0.8,
            "loss_recovered_mean": 0.8, "frac_dead": 0.0, "l0": l0, "n_tokens": 1000}


def _row(arch: str, k, l0: float, delta_ce: float, **extra) -> dict:
    return {"arch": arch, "k": k, "sae_tokens_per_s": 1000, "dead_latents_training": 0,
            "core_eval_heldout": _core(l0, delta_ce), **extra}


def _result(runs: dict, synthetic_rows: list, tokens: int = 1_000_000, date: str = "2026-12-03T10:31:22") -> dict:
    sweep = {"cache": "WORK/CACHE", "hook_name": "blocks.2.hook_resid_pre", "tokens": tokens, "seed": 0,
             "threads": 2, "eval_tokens": 65536, "out": "WORK/runs", "saes": []}
    return {"date": date, "command": "python bench/architectures.py",
            "cache": {"command": "saelab cache --model reference --tokens 2M --with-grads --out CACHE"},
            "sweep": {"command": "saelab train --sweep SWEEP.yaml", "file": yaml.safe_dump(sweep)},
            "train_tokens": "1M", "ks": [16], "seed": 0, "n_latents": 4096, "runs": runs,
            "synthetic": {"spec": {"k": 2, "steps": 1500, "seed": 0}, "rows": synthetic_rows}}


def _planted(arch: str, recovered: float, **extra) -> dict:
    return {"arch": arch, "recovered": recovered, "absorption": 0.1, "dead": 0.0, "code_f1": 0.9, "l0": 2.0, **extra}


def test_sweep_entries_place_each_architecture_by_its_own_knob(ab):
    saes = ab.sweep_entries(["topk", "relu", "jumprelu", "gated"], [16, 32], [8.0, 16.0], 4096, 1e-3)
    assert [s["name"] for s in saes] == ["topk-k16", "jumprelu-k16", "topk-k32", "jumprelu-k32",
                                         "relu-l1-8", "gated-l1-8", "relu-l1-16", "gated-l1-16"]
    by = {s["name"]: s for s in saes}
    assert by["topk-k32"] == {"name": "topk-k32", "sae": {"architecture": "topk", "k": 32, "n_latents": 4096}}
    assert by["jumprelu-k32"]["sae"]["options"] == {"target_l0": 32} and by["jumprelu-k32"]["sae"]["k"] == 32
    assert by["gated-l1-16"] == {"name": "gated-l1-16", "lr": 1e-3, "sae": {"architecture": "gated",
                                                                           "n_latents": 4096,
                                                                           "options": {"l1_coef": 16.0}}}
    # every entry is a valid sweep entry of the library
    from saelab.config import TrainConfig, from_dict

    for s in saes:
        cfg = from_dict(TrainConfig, {k: v for k, v in s.items() if k != "name"})
        assert cfg.sae.architecture == s["sae"]["architecture"]
    assert from_dict(TrainConfig, by["relu-l1-8"]).sae.options["l1_coef"] == 8.0


def test_merge_adds_and_replaces_rows_and_keeps_the_others(ab):
    old = _result({"topk-k16": _row("topk", 16, 16, 1.3), "mp-k16": _row("mp", 16, 16, 0.6)},
                  [_planted("topk", 0.55), _planted("mp", 1.0)])  # rows of before the independent tree
    new = _result({"relu-l1-8": _row("relu", None, 60, 0.9, l1_coef=8.0, date="2027-01-01T00:00:00",
                                     command="python bench/architectures.py --archs relu,topk --merge"),
                   "topk-k16": _row("topk", 16, 16, 1.25)},
                  [_planted("topk", 0.6, parents="exclusive"), _planted("relu", 0.4, parents="exclusive"),
                   _planted("relu", 0.3, parents="independent")], date="2027-01-01T00:00:00")
    new["command"] = "python bench/architectures.py --archs relu,topk --merge"
    merged = ab.merge_result(old, new)
    assert list(merged["runs"]) == ["topk-k16", "mp-k16", "relu-l1-8"]  # replaced in place, new ones after
    assert merged["runs"]["topk-k16"]["core_eval_heldout"]["delta_ce"] == 1.25
    assert merged["runs"]["mp-k16"] == old["runs"]["mp-k16"]
    assert merged["runs"]["relu-l1-8"]["date"] == "2027-01-01T00:00:00"
    assert [(r["arch"], r.get("parents"), r["recovered"]) for r in merged["synthetic"]["rows"]] == [
        ("topk", "exclusive", 0.6), ("mp", None, 1.0), ("relu", "exclusive", 0.4), ("relu", "independent", 0.3)]
    assert merged["date"] == old["date"] and merged["command"] == old["command"]  # the table's own run stays on top
    assert merged["merges"][0]["date"] == "2027-01-01T00:00:00"
    assert merged["merges"][0]["command"].endswith("--merge")
    assert old["runs"]["topk-k16"]["core_eval_heldout"]["delta_ce"] == 1.3  # the input is not modified

    # printed: the new rows beside the old, every planted row with its tree
    text = ab.format_tables(merged)
    assert "relu-l1-8" in text and "mp-k16" in text
    assert "relu / independent" in text and "mp / exclusive" in text

    # the figure: one trace per architecture, λ-placed points labelled by λ, sorted by L0
    fig = ab.pareto_figure(merged["runs"])
    traces = {t.name: t for t in fig.data}
    assert len(fig.data) == 3
    relu = traces["ReLU (L1) (by λ)"]
    assert list(relu.text) == ["λ 8"] and "text" in relu.mode
    assert list(traces["TopK"].text) == ["k 16"] and list(traces["TopK"].y) == [1.25]


def test_merge_refuses_rows_trained_on_other_settings(ab):
    old = _result({"topk-k16": _row("topk", 16, 16, 1.3)}, [])
    new = _result({"relu-l1-8": _row("relu", None, 60, 0.9, l1_coef=8.0)}, [], tokens=200_000)
    with pytest.raises(ValueError, match="tokens 200000 .*1000000"):
        ab.merge_result(old, new)
    new = _result({"relu-l1-8": _row("relu", None, 60, 0.9, l1_coef=8.0)}, [])
    new["cache"]["command"] = new["cache"]["command"].replace("2M", "200k")
    with pytest.raises(ValueError, match="cache command"):
        ab.merge_result(old, new)
    new = _result({}, [])
    new["synthetic"]["spec"]["steps"] = 100
    with pytest.raises(ValueError, match="planted steps 100"):
        ab.merge_result(old | {"synthetic": _result({}, [])["synthetic"]}, new)


def test_a_gsae_row_prints_its_topk_fallback_beneath_it(ab):
    gsae = _row("gtopk", 32, 32, 1.07)
    gsae["core_eval_heldout"]["topk_fallback"] = {**_core(32, 1.11), "explained_variance": 0.6543}
    text = ab.format_tables(_result({"gtopk-k32": gsae, "topk-k32": _row("topk", 32, 32, 1.2)}, []))
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("gtopk-k32"))
    assert lines[at + 1].startswith("  TopK fallback") and "1.11" in lines[at + 1] and "0.6543" in lines[at + 1]
    assert "1.07" in lines[at] and sum("TopK fallback" in line for line in lines) == 1  # TopK itself has none
