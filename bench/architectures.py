"""Architecture comparison on the reference model: all seven architectures (TopK, BatchTopK, Matryoshka, g-SAE,
MP, mutual choice, feature choice) at k ∈ {16, 32, 64}, trained as ONE sweep (`saelab train --sweep`): the same
activation cache (with LM-loss gradients, for g-SAE), width, batches and seed for every SAE.

    python bench/architectures.py                                  # 2M cached tokens, 1M training tokens each
    python bench/architectures.py --train-tokens 20M --ks 32 --archs topk,batchtopk,matryoshka,gtopk
    python bench/architectures.py --cache-tokens 200k --train-tokens 200k --eval-tokens 16k --ks 32  # smoke run

For each SAE, on held-out tokens (each SAE's closing core evaluation): explained variance, ΔCE, KL, loss recovered
(zero / mean ablation), dead latents, mean L0 at inference, and its own training throughput (`sae_tokens_per_s`:
the time in its own steps, which a sweep logs per SAE). Dead latents in three windows, each labelled: the core
evaluation's held-out tokens (65k: blind below a density of ~1.5e-5), the dashboard's window (--dead-tokens, 1M
fresh tokens: the validation split, then train-split rows past the cache; one model pass for all SAEs, per
Matryoshka group too) and training's own (silent for the last dead_token_threshold tokens). Inference is each architecture's own rule: BatchTopK,
Matryoshka and mutual choice by their calibrated global threshold, feature choice by its calibrated per-latent
thresholds, g-SAE with the LM-loss gradient at the hook (and its TopK fallback beside it), MP by pursuit.
Then the planted-feature benchmark (`saelab bench synthetic`): recovery, absorption, dead. Writes
bench/results/architectures.json and the L0-vs-ΔCE Pareto plot bench/results/architectures_pareto.html (and .png
when kaleido, or Chromium through Playwright, can draw it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
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
# that table; the architectures added since (issue 26: relu, gated, jumprelu, abstopk) are not in it yet. --archs
# takes any trainable architecture of the registry.
ARCHS = ["topk", "batchtopk", "matryoshka", "gtopk", "mp", "mutual", "feature_choice"]
NAMES = {"topk": "TopK", "batchtopk": "BatchTopK", "matryoshka": "Matryoshka", "gtopk": "g-SAE", "mp": "MP",
         "mutual": "mutual choice", "feature_choice": "feature choice"}
COLS = [("EV", "explained_variance"), ("ΔCE", "delta_ce"), ("KL", "kl_sae"), ("LR zero", "loss_recovered_zero"),
        ("LR mean", "loss_recovered_mean"), ("dead % 65k", "frac_dead"), ("L0", "l0")]


def sh(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "saelab.cli", *cmd[1:]], check=True)
    return time.time() - t0


def pareto_figure(rows: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    for arch in dict.fromkeys(r["arch"] for r in rows.values()):  # the architectures run, in their order
        pts = sorted((r["core_eval_heldout"]["l0"], r["core_eval_heldout"]["delta_ce"], r["k"])
                     for r in rows.values() if r["arch"] == arch)
        name = NAMES.get(arch, arch)
        if pts:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                     name=name + (" (= BatchTopK)" if arch == "mutual" else ""),
                                     line={"dash": "dash"} if arch == "mutual" else None,
                                     text=[f"k={p[2]}" for p in pts],
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
            page = browser.new_page(viewport={"width": 920, "height": 580})
            page.goto(html.resolve().as_uri())
            page.wait_for_selector(".main-svg")
            page.screenshot(path=str(png))
            browser.close()
        return "chromium"
    except Exception as e:  # no browser here: the HTML is the figure
        print(f"no PNG ({type(e).__name__}: {e})")
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-tokens", default="2M")
    ap.add_argument("--train-tokens", default="1M")
    ap.add_argument("--eval-tokens", default="65536")
    ap.add_argument("--dead-tokens", default="1M", help="fresh tokens of the dead-latent count in the dashboard's "
                                                        "window (0: skip it)")
    ap.add_argument("--ks", default="16,32,64", help="k of every architecture (an L0 sweep)")
    ap.add_argument("--n-latents", default="4096")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma list of trainable architectures (default: the "
                                                               "published table's seven)")
    ap.add_argument("--synthetic-steps", default="1500", help="steps of the planted-feature benchmark (0: skip it)")
    ap.add_argument("--workdir", default="", help="keep CACHE and runs here (default: a temporary directory); an "
                                                  "existing CACHE there is reused, an interrupted sweep resumes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "architectures.json"))
    ap.add_argument("--replot", action="store_true", help="only redraw the plot and tables from --out's JSON")
    args = ap.parse_args()
    if args.replot:
        return report(json.loads(Path(args.out).read_text()), Path(args.out))
    import yaml

    from saelab.settings import parse_count

    from saelab.sae.architectures import registry

    archs, ks = args.archs.split(","), [int(k) for k in args.ks.split(",")]
    trainable = [name for name, arch in registry().items() if arch.trainable]
    unknown = [a for a in archs if a not in trainable]
    if unknown:
        ap.error(f"--archs: {', '.join(unknown)}: not a trainable architecture; choose from {', '.join(trainable)}")
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        cache = work / "CACHE"
        cache_cmd = ["saelab", "cache", "--model", "reference", "--hooks", HOOK, "--tokens", args.cache_tokens,
                     "--with-grads", "--out", str(cache)]
        cache_s = sh(cache_cmd)  # resumes (or does nothing) when the workdir already holds it
        saes = [{"name": f"{a}-k{k}", "sae": {"architecture": a, "k": k, "n_latents": int(args.n_latents)}}
                for k in ks for a in archs]
        sweep = work / "sweep.yaml"
        sweep.write_text(yaml.safe_dump({"cache": str(cache), "sae": {"hook_name": HOOK},
                                         "tokens": parse_count(args.train_tokens),
                                         "seed": int(args.seed), "threads": int(args.threads),
                                         "eval_tokens": parse_count(args.eval_tokens), "out": str(work / "runs"),
                                         "saes": saes}, sort_keys=False))
        sweep_cmd = ["saelab", "train", "--sweep", str(sweep), "--no-progress"]
        if (work / "runs").exists():
            sweep_cmd.append("--resume")
        wall = sh(sweep_cmd)
        sweep_text = sweep.read_text().replace(str(work), "WORK")
        rows = {}
        for entry in saes:
            run = work / "runs" / entry["name"]
            info = json.loads((run / "sae" / "saelab.json").read_text())
            log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
            rows[entry["name"]] = {
                "arch": entry["sae"]["architecture"], "k": entry["sae"]["k"],
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
        synthetic = None
        if int(args.synthetic_steps) > 0:
            syn_cmd = ["saelab", "bench", "synthetic", "--steps", args.synthetic_steps, "--seed", args.seed,
                       "--out", str(work / "synthetic")]
            sh(syn_cmd)
            synthetic = json.loads((work / "synthetic" / "synthetic.json").read_text())
            synthetic["command"] = " ".join(syn_cmd).replace(str(work), "WORK")
    result = {
        "bench": "architectures: seven architectures x k, 16x, one sweep (same cache, batches, seed)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"cpu ({torch.get_num_threads()} torch threads available, {platform.processor() or platform.machine()})",
        "cache": {"command": " ".join(cache_cmd).replace(str(cache), "CACHE"), "wall_s": round(cache_s, 1)},
        "sweep": {"command": " ".join(sweep_cmd).replace(str(sweep), "SWEEP.yaml"), "file": sweep_text,
                  "wall_s": round(wall, 1)},
        "train_tokens": args.train_tokens, "ks": ks, "seed": int(args.seed), "n_latents": int(args.n_latents),
        "runs": rows, "synthetic": synthetic,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    report(result, out)


def report(result: dict, out: Path) -> None:
    """The Pareto plot (HTML + PNG) and the tables on stdout."""
    rows, synthetic = result["runs"], result["synthetic"]
    fig = pareto_figure(rows)
    html, png = out.with_name(out.stem + "_pareto.html"), out.with_name(out.stem + "_pareto.png")
    # the HTML loads plotly.js from its CDN (a few KB in the repository, not 4.7 MB); the PNG is the offline view,
    # drawn from a self-contained copy
    fig.write_html(str(html), include_plotlyjs="cdn")
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "pareto.html"
        fig.write_html(str(full), include_plotlyjs=True)
        drawn = save_png(fig, full, png)

    print(f"\n{'SAE':<20}" + "".join(f"{c:>11}" for c, _ in COLS) + f"{'dead % 1M':>11}{'dead train':>11}"
          f"{'tok/s':>9}")
    for name, r in rows.items():
        core = r["core_eval_heldout"]
        vals = [core.get(key, float("nan")) * (100 if key == "frac_dead" else 1) for _, key in COLS]
        wide = r.get("dead_dashboard_window", {})
        print(f"{name:<20}" + "".join(f"{v:>11.4g}" for v in vals) + f"{100 * wide.get('frac_dead', float('nan')):>11.4g}"
              f"{r['dead_latents_training']:>11}{r['sae_tokens_per_s']:>9,}")
    from saelab.dashboard.stats import format_dead

    first = next(iter(rows.values()))
    wide = first.get("dead_dashboard_window", {}).get("window", "(not counted)")
    train = first.get("dead_training_window", "training's window")
    print(f"dead % 65k: never active in the core eval's held-out window ({first['core_eval_heldout']['n_tokens']:,} "
          f"tokens); dead % 1M: in {wide}; dead train: dead latents in {train}")
    for name, r in rows.items():
        if r.get("dead_dashboard_window", {}).get("groups"):
            print(f"{name}: {format_dead(r['dead_dashboard_window'])}")
    if synthetic:
        print(f"\n{'planted':<20}" + "".join(f"{c:>13}" for c in ("recovered", "absorption", "dead", "code F1")))
        for r in synthetic["rows"]:  # one row per architecture and planted tree (exclusive / independent parents)
            print(f"{r['arch'] + ' / ' + r.get('parents', 'exclusive'):<20}" + "".join(f"{r[c]:>13.3f}" for c in ("recovered", "absorption", "dead",
                                                                          "code_f1")))
    print(f"wrote {out}, {html}" + (f", {png} ({drawn})" if drawn else ""))


if __name__ == "__main__":
    main()
