"""Architecture comparison on the reference model: the trainable architectures on one L0 sweep, trained as ONE sweep
(`saelab train --sweep`): the same activation cache (with LM-loss gradients, for g-SAE), width, batches and seed for
every SAE. Each architecture is placed on the L0 axis by its own knob: k (TopK and the other fixed-budget rules,
AbsTopK), `target_l0` = k (JumpReLU: its controller steers λ to that mean L0), or the L1 coefficient λ (ReLU and
Gated, which have no k: one SAE per --l1-coefs value, named by it, at --l1-lr).

    python bench/architectures.py                                  # 2M cached tokens, 1M training tokens each
    python bench/architectures.py --train-tokens 20M --ks 32 --archs topk,batchtopk,matryoshka,gtopk
    python bench/architectures.py --cache-tokens 200k --train-tokens 200k --eval-tokens 16k --ks 32  # smoke run
    # add the issue-26 architectures to the published table without retraining its seven: a workdir whose CACHE is
    # a symlink to an existing cache written by the same `saelab cache` command (it is complete, so it is only read)
    mkdir -p /tmp/arch-new && ln -s /path/to/CACHE /tmp/arch-new/CACHE
    python bench/architectures.py --archs relu,gated,jumprelu,abstopk --merge --workdir /tmp/arch-new

--merge adds the new rows to --out's JSON (a row of the same name is replaced; planted-feature rows by architecture
and tree), keeps the others, and records each new row's own command and date (and the run under `merges`). It
refuses a result trained on other settings (training tokens, seed, width, eval tokens, hook, cache command).

For each SAE, on held-out tokens (each SAE's closing core evaluation): explained variance, ΔCE, KL, loss recovered
(zero / mean ablation), dead latents, mean L0 at inference, and its own training throughput (`sae_tokens_per_s`:
the time in its own steps, which a sweep logs per SAE). Dead latents in three windows, each labelled: the core
evaluation's held-out tokens (65k: blind below a density of ~1.5e-5), the dashboard's window (--dead-tokens, 1M
fresh tokens: the validation split, then train-split rows past the cache; one model pass for all SAEs, per
Matryoshka group too) and training's own (silent for the last dead_token_threshold tokens). Inference is each architecture's own rule: BatchTopK,
Matryoshka and mutual choice by their calibrated global threshold, feature choice by its calibrated per-latent
thresholds, g-SAE with the LM-loss gradient at the hook (and its TopK fallback beside it), MP by pursuit.
Then the planted-feature benchmark (`saelab bench synthetic --archs` the same architectures, those it can train):
recovery, absorption, dead. Writes bench/results/architectures.json and the L0-vs-ΔCE Pareto plot
bench/results/architectures_pareto.html (and .png when kaleido, or Chromium through Playwright, can draw it).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HOOK = "blocks.2.hook_resid_pre"
# The default --archs: the seven of the published table (bench/results/architectures.json, the README's numbers),
# kept as a list rather than derived from the registry so that rerunning the script without --archs reproduces
# that table. NEW_ARCHS (issue 26) join it through --merge; --archs takes any trainable architecture of the registry.
ARCHS = ["topk", "batchtopk", "matryoshka", "gtopk", "mp", "mutual", "feature_choice"]
NEW_ARCHS = ["relu", "gated", "jumprelu", "abstopk"]
NAMES = {"topk": "TopK", "batchtopk": "BatchTopK", "matryoshka": "Matryoshka", "gtopk": "g-SAE", "mp": "MP",
         "mutual": "mutual choice", "feature_choice": "feature choice", "relu": "ReLU (L1)", "gated": "Gated",
         "jumprelu": "JumpReLU", "abstopk": "AbsTopK"}
COLS = [("EV", "explained_variance"), ("ΔCE", "delta_ce"), ("KL", "kl_sae"), ("LR zero", "loss_recovered_zero"),
        ("LR mean", "loss_recovered_mean"), ("dead % 65k", "frac_dead"), ("L0", "l0")]
# README's λ table: 4,096 latents, 500k tokens at batch 1,024 (488 steps) gave L0 141 at λ 2 and 100 at λ 4
# (L0 ∝ λ^-0.5 there; 1,024 latents: λ^-0.6). 1M tokens at batch 4,096 is half as many steps, which leaves L0
# higher, so the grid aims past L0 16-64 by that rule: ~65, ~45, ~30 extrapolated, dead latents rising with λ
L1_COEFS = "8,16,32"
L1_LR = "1e-3"  # README: ReLU SAEs learn slowly from their 0.1-norm init; short runs need --lr 1e-3 or more


def placement(arch: str) -> str:
    """How `arch` is put on the L0 axis, read from its options: "l1" (an L1 coefficient, no k), "target_l0" (k is
    the L0 its controller steers to) or "k"."""
    from saelab.sae.architectures import get_architecture

    fields = {f.name for f in dataclasses.fields(get_architecture(arch).Options)}
    return "l1" if "l1_coef" in fields else "target_l0" if "target_l0" in fields else "k"


def sweep_entries(archs: list[str], ks: list[int], l1_coefs: list[float], n_latents: int, l1_lr: float) -> list[dict]:
    """The sweep's `saes`: each k-placed architecture at every k (JumpReLU with target_l0 = k), then each
    λ-placed one at every λ, named `<arch>-k<k>` / `<arch>-l1-<λ>`."""
    by_k = [a for a in archs if placement(a) != "l1"]
    by_l1 = [a for a in archs if placement(a) == "l1"]
    saes = []
    for k in ks:
        for a in by_k:
            sae = {"architecture": a, "k": k, "n_latents": n_latents}
            if placement(a) == "target_l0":
                sae["options"] = {"target_l0": k}
            saes.append({"name": f"{a}-k{k}", "sae": sae})
    for lam in l1_coefs:
        for a in by_l1:
            saes.append({"name": f"{a}-l1-{lam:g}", "sae": {"architecture": a, "n_latents": n_latents,
                                                             "options": {"l1_coef": lam}}, "lr": l1_lr})
    return saes


def shared_settings(sweep: dict) -> dict:
    """What makes two sweeps' SAEs comparable rows of one table (files of older versions kept hook_name on top)."""
    return {"tokens": sweep.get("tokens"), "seed": sweep.get("seed"), "eval_tokens": sweep.get("eval_tokens"),
            "batch_size": sweep.get("batch_size"),
            "hook_name": sweep.get("hook_name") or (sweep.get("sae") or {}).get("hook_name")}


def differences(old: dict, new: dict) -> list[str]:
    """Why `new`'s rows cannot join `old`'s table: the training settings, the cache command and the planted
    benchmark's spec (keys both record) must agree."""
    import yaml

    out = []
    for key in ("n_latents", "seed"):
        if old.get(key) != new.get(key):
            out.append(f"{key} {new.get(key)!r} (the result has {old.get(key)!r})")
    if old["cache"]["command"] != new["cache"]["command"]:
        out.append(f"cache command {new['cache']['command']!r} (the result's: {old['cache']['command']!r})")
    mine, theirs = shared_settings(yaml.safe_load(new["sweep"]["file"])), shared_settings(yaml.safe_load(
        old["sweep"]["file"]))
    out += [f"{key} {mine[key]!r} (the result has {theirs[key]!r})" for key in mine if mine[key] != theirs[key]]
    if old.get("synthetic") and new.get("synthetic"):
        a, b = old["synthetic"]["spec"], new["synthetic"]["spec"]
        out += [f"planted {key} {b[key]!r} (the result has {a[key]!r})" for key in a
                if key in b and key != "parents" and a[key] != b[key]]
    return out


def planted_key(row: dict) -> tuple[str, str]:
    return row["arch"], row.get("parents", "exclusive")  # rows written before the independent tree: exclusive


def merge_result(old: dict, new: dict) -> dict:
    """`old` with `new`'s rows added (a run of the same name, or a planted row of the same architecture and tree,
    replaced in place) and `new`'s run recorded under `merges`; `old`'s own settings stay on top."""
    problems = differences(old, new)
    if problems:
        raise ValueError("--merge: this run's " + "; ".join(problems) + ": its rows would not be comparable")
    out = copy.deepcopy(old)
    out["runs"].update(copy.deepcopy(new["runs"]))
    if new.get("synthetic"):
        if not out.get("synthetic"):
            out["synthetic"] = copy.deepcopy(new["synthetic"])
        else:
            rows = out["synthetic"]["rows"]
            where = {planted_key(r): i for i, r in enumerate(rows)}
            for r in new["synthetic"]["rows"]:
                if planted_key(r) in where:
                    rows[where[planted_key(r)]] = copy.deepcopy(r)
                else:
                    rows.append(copy.deepcopy(r))
    out.setdefault("merges", []).append(
        {key: new[key] for key in ("date", "command", "device", "cache", "sweep", "train_tokens", "ks", "l1_coefs")
         if key in new} | {"synthetic_command": (new.get("synthetic") or {}).get("command")})
    return out


def sh(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "saelab.cli", *cmd[1:]], check=True)
    return time.time() - t0


def point_label(row: dict) -> str:
    return f"λ {row['l1_coef']:g}" if row.get("l1_coef") is not None else f"k {row['k']}"


def pareto_figure(rows: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    for arch in dict.fromkeys(r["arch"] for r in rows.values()):  # the architectures run, in their order
        mine = sorted((r for r in rows.values() if r["arch"] == arch), key=lambda r: r["core_eval_heldout"]["l0"])
        name = NAMES.get(arch, arch)
        by_l1 = any(r.get("l1_coef") is not None for r in mine)
        fig.add_trace(go.Scatter(x=[r["core_eval_heldout"]["l0"] for r in mine],
                                 y=[r["core_eval_heldout"]["delta_ce"] for r in mine],
                                 # λ-placed points carry their λ on the figure (the PNG has no hover)
                                 mode="lines+markers+text" if by_l1 else "lines+markers",
                                 textposition="top center",
                                 name=name + (" (= BatchTopK)" if arch == "mutual" else " (by λ)" if by_l1 else ""),
                                 line={"dash": "dash"} if arch == "mutual" else {"dash": "dot"} if by_l1 else None,
                                 text=[point_label(r) for r in mine],
                                 hovertemplate="%{text}<br>L0 %{x:.1f}<br>ΔCE %{y:.3f}<extra>" + name
                                               + "</extra>"))
    fig.update_layout(title="Sparsity vs reconstruction cost on the reference model (held-out tokens)",
                      xaxis_title="mean L0 at inference (log)", yaxis_title="ΔCE, nats (log)", xaxis_type="log",
                      yaxis_type="log", template="plotly_white", width=900, height=560)
    return fig


def save_png(fig, html: Path, png: Path) -> str | None:
    """kaleido if installed, else Debian's Chromium through Playwright (no browser download); None if neither."""
    try:
        fig.write_image(str(png), scale=2)
        return "kaleido"
    except Exception:
        pass
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": (fig.layout.width or 900) + 20,
                                              "height": (fig.layout.height or 560) + 20})
            page.goto(html.resolve().as_uri())
            page.wait_for_selector(".main-svg")
            page.screenshot(path=str(png))
            browser.close()
        return "chromium"
    except Exception as e:  # no browser here: the HTML is the figure
        print(f"no PNG ({type(e).__name__}: {e})")
        return None


def write_figure(fig, html: Path, png: Path) -> str | None:
    """The figure as HTML loading plotly.js from its CDN (a few KB in the repository, not 4.7 MB) and as a PNG, the
    offline view, drawn from a self-contained copy; → what drew the PNG (None: no PNG)."""
    fig.write_html(str(html), include_plotlyjs="cdn")
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / html.name
        fig.write_html(str(full), include_plotlyjs=True)
        return save_png(fig, full, png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-tokens", default="2M")
    ap.add_argument("--train-tokens", default="1M")
    ap.add_argument("--eval-tokens", default="65536")
    ap.add_argument("--dead-tokens", default="1M", help="fresh tokens of the dead-latent count in the dashboard's "
                                                        "window (0: skip it)")
    ap.add_argument("--ks", default="16,32,64", help="k of every architecture placed by k (an L0 sweep); JumpReLU "
                                                     "trains with target_l0 = k")
    ap.add_argument("--l1-coefs", default=L1_COEFS, help="λ of every architecture placed by its L1 coefficient "
                                                         "(relu, gated: no k), one SAE per value")
    ap.add_argument("--l1-lr", default=L1_LR, help="learning rate of the λ-placed SAEs (the others: the default)")
    ap.add_argument("--n-latents", default="4096")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma list of trainable architectures (default: the "
                                                               "published table's seven; issue 26's: "
                                                               + ",".join(NEW_ARCHS) + ")")
    ap.add_argument("--synthetic-steps", default="1500", help="steps of the planted-feature benchmark (0: skip it)")
    ap.add_argument("--workdir", default="", help="keep CACHE and runs here (default: a temporary directory); an "
                                                  "existing CACHE there is reused (a symlink to a complete cache of "
                                                  "the same command is only read), an interrupted sweep resumes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "architectures.json"))
    ap.add_argument("--merge", action="store_true", help="add this run's rows to --out's result (same-named rows "
                                                         "replaced, the others kept) instead of overwriting it")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot and tables from --out's JSON")
    args = ap.parse_args()
    out = Path(args.out)
    if args.replot:
        return report(json.loads(out.read_text()), out)
    import yaml

    from saelab.files import write_text_atomic
    from saelab.sae.architectures import registry
    from saelab.settings import parse_count
    from saelab.synthetic.runner import planted_archs

    archs, ks = args.archs.split(","), [int(k) for k in args.ks.split(",")]
    l1_coefs = [float(c) for c in args.l1_coefs.split(",")]
    trainable = [name for name, arch in registry().items() if arch.trainable]
    unknown = [a for a in archs if a not in trainable]
    if unknown:
        ap.error(f"--archs: {', '.join(unknown)}: not a trainable architecture; choose from {', '.join(trainable)}")
    if args.merge and not out.exists():
        ap.error(f"--merge: {out} does not exist; run once without --merge to write it")
    old = json.loads(out.read_text()) if args.merge else None
    date = datetime.datetime.now().isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        command = shlex.join(["python", "bench/architectures.py", *sys.argv[1:]]).replace(str(work), "WORK")
        cache = work / "CACHE"
        cache_cmd = ["saelab", "cache", "--model", "reference", "--hooks", HOOK, "--tokens", args.cache_tokens,
                     "--with-grads", "--out", str(cache)]
        saes = sweep_entries(archs, ks, l1_coefs, int(args.n_latents), float(args.l1_lr))
        sweep = work / "sweep.yaml"
        sweep_doc = yaml.safe_dump({"cache": str(cache), "sae": {"hook_name": HOOK},
                                    "tokens": parse_count(args.train_tokens), "seed": int(args.seed),
                                    "threads": int(args.threads), "eval_tokens": parse_count(args.eval_tokens),
                                    "out": str(work / "runs"), "saes": saes}, sort_keys=False)
        synthetic_archs = [a for a in archs if a in planted_archs()]  # g-SAE needs a language model
        synthetic_on = int(args.synthetic_steps) > 0 and synthetic_archs
        syn_cmd = ["saelab", "bench", "synthetic", "--steps", args.synthetic_steps, "--seed", args.seed,
                   "--archs", ",".join(synthetic_archs), "--out", str(work / "synthetic")]
        result = {
            "bench": f"architectures: {', '.join(archs)}; by k, target_l0 = k or λ; 16x; one sweep (same cache, "
                     f"batches, seed)",
            "date": date, "command": command,
            "device": f"cpu ({torch.get_num_threads()} torch threads available, "
                      f"{platform.processor() or platform.machine()})",
            "cache": {"command": " ".join(cache_cmd).replace(str(cache), "CACHE")},
            "sweep": {"command": "saelab train --sweep SWEEP.yaml --no-progress",
                      "file": sweep_doc.replace(str(work), "WORK")},
            "train_tokens": args.train_tokens, "ks": ks, "l1_coefs": l1_coefs, "seed": int(args.seed),
            "n_latents": int(args.n_latents),
            "synthetic": {"spec": {"steps": int(args.synthetic_steps), "seed": int(args.seed)}} if synthetic_on else None,
        }
        if old is not None:  # refuse before anything runs
            problems = differences(old, result)
            if problems:
                ap.error("--merge: this run's " + "; ".join(problems) + ": its rows would not be comparable")
        result["cache"]["wall_s"] = round(sh(cache_cmd), 1)  # resumes (or only reads) a cache the workdir holds
        sweep.write_text(sweep_doc)
        sweep_cmd = ["saelab", "train", "--sweep", str(sweep), "--no-progress"]
        if (work / "runs").exists():
            sweep_cmd.append("--resume")
        result["sweep"] |= {"command": " ".join(sweep_cmd).replace(str(sweep), "SWEEP.yaml"),
                            "wall_s": round(sh(sweep_cmd), 1)}
        rows = {}
        for entry in saes:
            run = work / "runs" / entry["name"]
            info = json.loads((run / "sae" / "saelab.json").read_text())
            log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
            lam = entry["sae"].get("options", {}).get("l1_coef")
            rows[entry["name"]] = {
                "arch": entry["sae"]["architecture"], "k": None if lam is not None else entry["sae"]["k"],
                **({"l1_coef": lam} if lam is not None else {}),
                "sweep_entry": entry, "command": command, "date": date,
                "sae_tokens_per_s": round(statistics.median(r["sae_tokens_per_s"] for r in log[1:] or log)),
                "dead_latents_training": info["training"]["dead_latents"],
                "dead_training_window": f"training's window: silent for the last "
                                        f"{info['training']['dead_token_threshold']:,} training tokens",
                "calibration": info["training"].get("calibration"),
                "last_logged": log[-1],
                "core_eval_heldout": json.loads((run / "eval" / "core.json").read_text()),
            }
            for key in ("l0_hist", "log10_density_hist", "latent_density", "mse_per_dim", "l0_quantiles"):
                rows[entry["name"]]["core_eval_heldout"].pop(key, None)  # per-latent arrays: in the run folder
        if parse_count(args.dead_tokens) > 0:  # one model pass, every SAE of the sweep on the same fresh rows
            from saelab.dashboard.run import count_dead

            runs = [work / "runs" / entry["name"] for entry in saes]
            for entry, dead in zip(saes, count_dead(runs, parse_count(args.dead_tokens), progress=False).values()):
                rows[entry["name"]]["dead_dashboard_window"] = dead
        result["runs"] = rows
        if synthetic_on:
            sh(syn_cmd)
            synthetic = json.loads((work / "synthetic" / "synthetic.json").read_text())
            synthetic["command"] = " ".join(syn_cmd).replace(str(work), "WORK")
            for r in synthetic["rows"]:
                r |= {"command": synthetic["command"], "date": date}
            result["synthetic"] = synthetic
    if old is not None:
        result = merge_result(old, result)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=1))
    report(result, out)


def report(result: dict, out: Path) -> None:
    """The Pareto plot (HTML + PNG) and the tables on stdout."""
    html, png = out.with_name(out.stem + "_pareto.html"), out.with_name(out.stem + "_pareto.png")
    drawn = write_figure(pareto_figure(result["runs"]), html, png)
    print(format_tables(result))
    print(f"wrote {out}, {html}" + (f", {png} ({drawn})" if drawn else ""))


def format_tables(result: dict) -> str:
    """The SAE table (one line per run) and the planted-feature table, as printed."""
    from saelab.dashboard.stats import format_dead

    rows, synthetic = result["runs"], result["synthetic"]
    lines = [f"\n{'SAE':<20}" + "".join(f"{c:>11}" for c, _ in COLS) + f"{'dead % 1M':>11}{'dead train':>11}"
             f"{'tok/s':>9}"]
    for name, r in rows.items():
        core = r["core_eval_heldout"]
        vals = [core.get(key, float("nan")) * (100 if key == "frac_dead" else 1) for _, key in COLS]
        wide = r.get("dead_dashboard_window", {})
        lines.append(f"{name:<20}" + "".join(f"{v:>11.4g}" for v in vals)
                     + f"{100 * wide.get('frac_dead', float('nan')):>11.4g}"
                       f"{r['dead_latents_training']:>11}{r['sae_tokens_per_s']:>9,}")
        fallback = core.get("topk_fallback")  # a g-SAE: the same tokens encoded without the gradient
        if fallback:
            lines.append(f"{'  TopK fallback':<20}" + "".join(
                f"{fallback.get(key, float('nan')) * (100 if key == 'frac_dead' else 1):>11.4g}" for _, key in COLS))
    first = next(iter(rows.values()))
    wide = first.get("dead_dashboard_window", {}).get("window", "(not counted)")
    train = first.get("dead_training_window", "training's window")
    lines.append(f"dead % 65k: never active in the core eval's held-out window "
                 f"({first['core_eval_heldout']['n_tokens']:,} tokens); dead % 1M: in {wide}; dead train: dead "
                 f"latents in {train}")
    lines += [f"{name}: {format_dead(r['dead_dashboard_window'])}" for name, r in rows.items()
              if r.get("dead_dashboard_window", {}).get("groups")]
    if synthetic:
        cols = ("recovered", "absorption", "dead", "code_f1", "l0")
        lines.append(f"\n{'planted':<26}" + "".join(f"{c:>11}" for c in cols))
        for r in synthetic["rows"]:  # one row per architecture and planted tree (exclusive / independent parents)
            arch, parents = planted_key(r)
            lines.append(f"{arch + ' / ' + parents:<26}" + "".join(f"{r[c]:>11.3f}" for c in cols))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
