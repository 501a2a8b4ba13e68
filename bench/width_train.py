"""A 1,048,576-latent TopK SAE trained on this machine: `saelab train` from the reference model's activation cache
(the streaming encoder, `--encoder-chunk auto`), then its closing core evaluation, then SAELens loading the saved
folder and encoding the same rows as saelab. Records the run's peak RSS beside the parameters + gradients + Adam
state one process must hold, the step time, the evaluation and the SAELens check.

    python bench/width_train.py --cache CACHE --workdir W            # 200 steps of 1,024 tokens; resumes W's run
    python bench/width_train.py --cache CACHE --workdir W --steps 50 --n-latents 262k    # a smaller try

The run checkpoints every --checkpoint-every steps (a 1M-latent checkpoint is about 6 GB: parameters, Adam's two
moments), so a run cut short resumes where it stopped when the command is given again; peak RSS is then the last
part's. The SAELens check needs SAELens's own venv (--saelens-python, default $SAELENS_PYTHON): it loads the folder
with `SAE.load_from_disk`, encodes 16 rows of the cache and decodes them; saelab does the same from the same folder,
and the active latents, their values and the reconstructions are compared. Writes bench/results/width_train.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "width_train.json"

SAELENS_SIDE = """
import json, sys, torch
from sae_lens import SAE
sae = SAE.load_from_disk(sys.argv[1])
x = torch.tensor(json.loads(open(sys.argv[2]).read()))
with torch.no_grad():
    acts = sae.encode(x)
    x_hat = sae.decode(acts)
nz = [row.nonzero().flatten().tolist() for row in acts]
print(json.dumps({"class": type(sae).__name__, "d_sae": sae.cfg.d_sae, "indices": nz,
                  "values": [acts[i, idx].tolist() for i, idx in enumerate(nz)], "x_hat": x_hat.tolist()}))
"""


def saelens_check(folder: Path, x, python: Path, tmp: Path) -> dict:
    """SAELens's codes and reconstruction of `x` from `folder` against saelab's."""
    import torch

    from saelab import load_sae

    sae = load_sae(folder)
    with torch.no_grad():
        code = sae.encode(x)
        ours_hat = sae.decode(code, x)
    (tmp / "x.json").write_text(json.dumps(x.tolist()))
    proc = subprocess.run([str(python), "-c", SAELENS_SIDE, str(folder), str(tmp / "x.json")], capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]}
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    dense = code.to_dense(sae.n_latents)
    ours_idx = [row.nonzero().flatten().tolist() for row in dense]
    same = all(a == b for a, b in zip(ours_idx, theirs["indices"]))
    value_diff = max(float((dense[i, idx] - torch.tensor(v)).abs().max()) for i, (idx, v) in
                     enumerate(zip(ours_idx, theirs["values"]))) if same else None
    return {"class": theirs["class"], "d_sae": theirs["d_sae"], "rows": x.shape[0], "same_active_latents": same,
            "mean_active": statistics.mean(len(i) for i in ours_idx), "max_value_diff": value_diff,
            "max_x_hat_diff": float((ours_hat - torch.tensor(theirs["x_hat"])).abs().max())}


def main() -> int:
    from width import parse_width  # bench/width.py: '1M' → 2^20

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="an activation cache of the reference model's default hook")
    ap.add_argument("--workdir", type=Path, required=True, help="the run folder's parent (kept: resumes)")
    ap.add_argument("--n-latents", default="1M", help="width: 1M = 1,048,576 (default)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--checkpoint-every", type=int, default=25)
    ap.add_argument("--lr", default="", help="learning rate (default saelab's, 2e-4 / sqrt(n / 2^14): 2.5e-5 at 1M, "
                                             "tuned for long runs; a few hundred steps move such an SAE little)")
    ap.add_argument("--dead-tokens", default="", help="saelab's --dead-tokens (default its own: a quarter of the run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", default="65536")
    ap.add_argument("--saelens-python", type=Path, default=Path(os.environ.get("SAELENS_PYTHON", "")),
                    help="SAELens's venv python ($SAELENS_PYTHON); none: the check is skipped")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    n = parse_width(args.n_latents)
    run = args.workdir / f"topk-{n}"
    cmd = ["saelab", "train", "--cache", args.cache, "--n-latents", str(n), "--k", str(args.k),
           "--batch-size", str(args.batch_size), "--tokens", str(args.batch_size * args.steps),
           "--checkpoint-every", str(args.checkpoint_every), "--threads", str(args.threads),
           "--eval-tokens", args.eval_tokens, "--out", str(run), "--no-progress", *(["--lr", args.lr] if args.lr else []),
           *(["--dead-tokens", args.dead_tokens] if args.dead_tokens else [])]
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
        cmd.append("--resume")
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", "saelab.cli", *cmd[1:]])  # this interpreter's saelab
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if code != 0:
        print(f"saelab train exited with {code}", file=sys.stderr)
        return code

    from saelab.activations import ActivationCache
    from saelab.training.memory import state_bytes

    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    core = json.loads((run / "eval" / "core.json").read_text())
    d_in = int(json.loads((run / "sae" / "cfg.json").read_text())["d_in"])
    result = {
        "bench": "width_train: one TopK SAE of n latents trained, evaluated and loaded by SAELens on this machine",
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
        "command": " ".join(cmd).replace(str(args.workdir), "W").replace(str(args.cache), "CACHE"),
        "n_latents": n, "k": args.k, "batch_size": args.batch_size, "steps": log[-1]["step"] if log else 0,
        "wall_s": round(wall, 1), "resumed": "--resume" in cmd,
        "peak_rss_gb": peak / 1e9, "state_gb": state_bytes(d_in, 0, n, False) / 1e9,
        "step_s_median": statistics.median(args.batch_size / r["tokens_per_s"] for r in log) if log else None,
        # each logged row's rate covers the steps since the row before (a resumed part's first row: since the start)
        "step_s_by_logged_step": [[r["step"], round(args.batch_size / r["tokens_per_s"], 2)] for r in log],
        "load_avg": os.getloadavg()[0],
        "last_logged": log[-1] if log else None,
        "core_eval": {key: core.get(key) for key in ("explained_variance", "delta_ce", "l0", "frac_dead", "n_tokens",
                                                     "loss_recovered_zero", "loss_recovered_mean")},
    }
    if args.saelens_python.is_file():
        rows = next(iter(ActivationCache(args.cache, batch_size=16, seed=1))).acts.float()
        result["saelens"] = saelens_check(run / "sae", rows, args.saelens_python, args.workdir)
    else:
        result["saelens"] = {"skipped": "no SAELens python (--saelens-python or $SAELENS_PYTHON)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "last_logged"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
