"""Evaluators: core metrics vs the model forwards they need, probing and steering scores of a 4096-latent SAE
against naive loops, and the steering claim of Arad et al. (top latents by output score vs by input score).

    python bench/evals.py --sae runs/NAME/sae               # a trained 4096-latent TopK SAE on the reference model
    python bench/evals.py --sae runs/NAME/sae --quick       # smaller budgets (a smoke run)

Measured in one run, on the same model and rows:
  * core: `evaluate_core` (first pass + CE pass) vs the bare forwards it needs — per batch one forward truncated
    after the hook and four full forwards, run without hooks — and vs the previous implementation (git HEAD~,
    loaded from `--old-core` when given). Target: ratio ≤ 1.5.
  * probing: activations of the reference tasks gathered once + every probe (14 tasks × k ∈ {1,2,5,10,20} × 3
    bases + dense), vs a naive loop that gathers activations once per task (extrapolated: 14 × one gather).
  * scores: input + output scores of every latent (one corpus sweep, batched prompt forwards) vs a naive loop of
    one forward per latent for the output score (timed on 64 latents, extrapolated to all, stated).
  * claim: steering success@20 of the top-N latents by output score vs the top-N by input score.
Writes bench/results/evals.json (date, machine, torch version, numbers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} CPUs)"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_core(model, sae, n_tokens: int, batch_rows: int = 16, old_core: str | None = None) -> dict:
    import torch

    from saelab.data.corpus import CorpusSpec
    from saelab.eval.core import evaluate_core
    from saelab.activations.capture import stop_layer
    from saelab.eval.splice import corpus_rows

    rows = corpus_rows(model, CorpusSpec(), "validation", 128, n_tokens // 128)
    stop = stop_layer([sae.cfg.hook_name], model.cfg.n_layers)

    def bare():
        with torch.no_grad():
            for i in range(0, rows.shape[0], batch_rows):
                tok = rows[i:i + batch_rows]
                model(tok, stop_at_layer=stop)
                for _ in range(4):
                    model(tok)

    with torch.no_grad():
        model(rows[:batch_rows])  # warm-up
    _, t_bare = timed(bare)
    m, t_eval = timed(lambda: evaluate_core(model, sae, rows=rows, n_tokens=None, batch_rows=batch_rows))
    out = {"tokens": int(rows.numel()), "batch_rows": batch_rows, "bare_forwards_s": t_bare, "evaluate_core_s": t_eval,
           "ratio": t_eval / t_bare, "ce_sae": m.ce_sae, "kl_sae": m.kl_sae}
    if old_core:
        import importlib.util

        spec = importlib.util.spec_from_file_location("old_core", old_core)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["old_core"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        m_old, t_old = timed(lambda: mod.evaluate_core(model, sae, rows=rows, n_tokens=None, batch_rows=batch_rows))
        out.update({"previous_evaluate_core_s": t_old, "previous_ratio": t_old / t_bare,
                    "previous_ce_sae": m_old.ce_sae, "previous_kl_sae": m_old.kl_sae})
    return out


def bench_probing(model, sae, max_tokens: int) -> dict:
    from saelab.data.corpus import CorpusSpec
    from saelab.data.labels import label_corpus
    from saelab.eval.probing import gather_token_data, probe_tasks

    texts, t_label = timed(lambda: label_corpus(CorpusSpec(), model.tokenizer, "validation", max_tokens))
    data, t_gather = timed(lambda: gather_token_data(model, sae.cfg.hook_name, texts))
    result, t_probe = timed(lambda: probe_tasks(data, sae))
    n_tasks = result.mean["n_tasks"]
    total = t_label + t_gather + t_probe
    naive = t_label + n_tasks * t_gather + t_probe
    return {"tokens": int(data.x.shape[0]), "n_tasks": n_tasks, "label_s": t_label, "gather_s": t_gather,
            "probe_s": t_probe, "total_s": total, "naive_gather_per_task_s_extrapolated": naive,
            "speedup_vs_naive": naive / total, "mean": result.mean, "result": result.to_dict()}


def bench_scores(model, sae, n_tokens: int, naive_latents: int = 64):
    import torch

    from saelab.eval.splice import capture, decoder_directions, gather_rows
    from saelab.eval.steering import SCORE_PROMPT, lens_tokens, output_scores, prompt_tokens, score_latents

    (scores, _), t_all = timed(lambda: score_latents(model, sae, n_tokens=n_tokens))
    lens = lens_tokens(model, sae)
    tok = prompt_tokens(model, SCORE_PROMPT)
    hook = sae.cfg.hook_name
    D = decoder_directions(sae)

    def naive():  # one forward per latent, as the paper's code does
        with torch.no_grad():
            _, acts = capture(model, tok, hook)
            amount = 10 * float(sae.encode(gather_rows(acts[hook])[-1:]).values.max())
            for f in range(naive_latents):
                def add(act, hook, f=f):
                    act = act.clone()
                    act[0, -1] += amount * D[f]
                    return act
                p = model.run_with_hooks(tok, fwd_hooks=[(hook, add)])[0, -1].softmax(-1)
                p.gather(0, lens[f])

    _, t_naive = timed(naive)
    n = sae.cfg.n_latents
    _, t_out_batched = timed(lambda: output_scores(model, sae, lens))
    return scores, {"n_latents": n, "sweep_tokens": n_tokens, "all_scores_s": t_all,
                    "output_scores_batched_s": t_out_batched,
                    "naive_output_per_latent_s_on": naive_latents,
                    "naive_output_scores_s_extrapolated": t_naive / naive_latents * n,
                    "output_speedup_vs_naive": t_naive / naive_latents * n / t_out_batched}


def distribution(v) -> dict:
    import numpy as np

    v = np.asarray(v, dtype=float)
    v = v[~np.isnan(v)]
    qs = [0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
    return {"n": int(len(v)), "mean": float(v.mean()), **{f"p{int(q * 100)}": float(np.quantile(v, q)) for q in qs},
            "share_over_0.1": float((v > 0.1).mean()), "share_over_0.5": float((v > 0.5).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", required=True, help="a 4096-latent SAE directory trained on the reference model")
    ap.add_argument("--core-tokens", type=int, default=32_768)
    ap.add_argument("--probe-tokens", type=int, default=80_000)
    ap.add_argument("--score-tokens", type=int, default=65_536)
    ap.add_argument("--claim-n", type=int, default=20)
    ap.add_argument("--old-core", default=None, help="a copy of the previous saelab/eval/core.py to time as well")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: core,probing,scores,claim")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "evals.json"))
    args = ap.parse_args()

    import torch

    from saelab.models import load_model
    from saelab.sae import SparseAutoencoder

    torch.set_num_threads(args.threads)
    model = load_model("reference")
    sae = SparseAutoencoder.load(args.sae)
    skip = set(filter(None, args.skip.split(",")))
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "threads": args.threads, "torch": torch.__version__, "sae": args.sae,
           "n_latents": sae.cfg.n_latents, "hook": sae.cfg.hook_name, "architecture": sae.cfg.architecture,
           "load_average_at_start": os.getloadavg()}
    if "core" not in skip:
        res["core"] = c = bench_core(model, sae, args.core_tokens, old_core=args.old_core)
        print(f"core eval    {c['tokens']:,} tokens: {c['evaluate_core_s']:.1f} s vs bare forwards "
              f"{c['bare_forwards_s']:.1f} s → ratio {c['ratio']:.2f}"
              + (f" (previous implementation {c['previous_ratio']:.2f})" if "previous_ratio" in c else ""))
    if "probing" not in skip:
        res["probing"] = p = bench_probing(model, sae, args.probe_tokens)
        k = p["mean"]
        print(f"probing      {p['n_tasks']} tasks on {p['tokens']:,} tokens: {p['total_s']:.1f} s "
              f"(label {p['label_s']:.1f}, gather {p['gather_s']:.1f}, probes {p['probe_s']:.1f}); naive "
              f"per-task gathering {p['naive_gather_per_task_s_extrapolated']:.0f} s (extrapolated)")
        print(f"             k=1 accuracy: SAE {k['1']['sae_accuracy']:.3f}, neurons {k['1']['neurons_accuracy']:.3f}, "
              f"rotation {k['1']['rotation_accuracy']:.3f}; dense {k['dense']['accuracy']:.3f}")
    scores = None
    if "scores" not in skip:
        scores, s = bench_scores(model, sae, args.score_tokens)
        res["scores"] = s
        res["scores"]["output_score_distribution"] = distribution(scores.output_score)
        res["scores"]["input_score_distribution"] = distribution(scores.input_score)
        print(f"scores       all {s['n_latents']:,} latents: {s['all_scores_s']:.1f} s (output scores batched "
              f"{s['output_scores_batched_s']:.1f} s vs naive {s['naive_output_scores_s_extrapolated']:.0f} s "
              f"extrapolated from {s['naive_output_per_latent_s_on']} latents: "
              f"{s['output_speedup_vs_naive']:.0f}×)")
    if "claim" not in skip and scores is not None:
        from saelab.eval.steering import ranking_experiment

        claim, t = timed(lambda: ranking_experiment(model, sae, scores, n=args.claim_n))
        claim.pop("detail")
        res["claim"] = claim | {"seconds": t}
        print(f"claim        top-{args.claim_n} by output score: success@20 {claim['success_top_output']:.2f} vs "
              f"top-{args.claim_n} by input score {claim['success_top_input']:.2f} → ratio {claim['ratio']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=float))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
