"""The training loop: batches → SAE → losses → Adam, with the decoder-norm constraint, dead-latent tracking
(in tokens), AuxK, gradient clipping, a metrics log, atomic checkpoints and bit-exact resume, and
`torch.distributed` data parallelism (launch with `torchrun`; gloo on CPU, NCCL on GPU).

`train(cfg, source)` takes any iterable of `Batch` (an `ActivationCache`, `stream_activations`, in-memory
activations); it neither knows nor cares where they come from.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from saelab.config import SAEConfig, TrainConfig, from_dict, save_config, to_dict
from saelab.sae import SparseAutoencoder
from saelab.training import checkpoint as ckpt


@dataclass
class TrainResult:
    run_dir: Path
    sae: SparseAutoencoder
    steps: int
    tokens: int
    last: dict  # the last logged metrics


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def lr_at(step: int, steps: int, cfg: TrainConfig, base_lr: float) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last `lr_decay_fraction` of the steps."""
    if step < cfg.lr_warmup_steps:
        return base_lr * (step + 1) / cfg.lr_warmup_steps
    decay_start = steps * (1 - cfg.lr_decay_fraction)
    if cfg.lr_decay_fraction > 0 and step >= decay_start:
        return base_lr * max(0.0, (steps - step) / (steps - decay_start))
    return base_lr


class MetricsLog:
    """`metrics.jsonl`, one JSON object per logged step; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))
        self.fh = open(path, "a")

    def write(self, row: dict) -> None:
        if self.enabled:
            self.fh.write(json.dumps(row) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.enabled:
            self.fh.close()


# fields that may change on --resume without changing what is trained
RESUME_FREE = {"resume", "out", "name", "threads", "log_every", "checkpoint_every", "keep_checkpoints", "eval_tokens",
               "model.device", "source", "cache"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not (key.endswith("options")):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume_config(saved: dict, new: dict, where) -> None:
    """Refuse to resume a run with settings that would change it (tokens, batch size, architecture, k, lr, …)."""
    from saelab.errors import ConfigError

    a, b = _flatten(saved), _flatten(new)
    for key in sorted(set(a) | set(b)):
        if key in RESUME_FREE or key.split(".")[0] in RESUME_FREE:
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)):
            va, vb = list(va), list(vb)
        if va != vb:
            raise ConfigError(f"--resume: {key} was {va!r} in the checkpoint ({where}) but is {vb!r} now",
                              hint=f"resume with the run's own settings (its config.yaml), or start a new run "
                                   f"with another --out")


def make_optimizer(sae: SparseAutoencoder, lr: float, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over the SAE's parameters; the multi-tensor (foreach) step, or the fused kernel on CUDA, instead of
    one small kernel per parameter and per operation."""
    fused = sae.W_dec.is_cuda
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                            fused=fused or None, foreach=None if fused else True)


def default_run_name(cfg: TrainConfig) -> str:
    model = Path(cfg.model.name).name.replace("/", "_")
    return f"{model}-{cfg.hook_name or cfg.sae.hook_name}-{cfg.sae.architecture}-k{cfg.sae.k}"


def train(cfg: TrainConfig, source: Iterable, run_dir: str | Path | None = None, progress: bool = True,
          device: str | torch.device = "cpu") -> TrainResult:
    """Train one SAE. The source yields `Batch`es of `cfg.batch_size` rows per process; with `torchrun`, each rank
    passes its own disjoint source and the global batch is `world_size × batch_size`."""
    rank, world = _world()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir or cfg.out or Path("runs") / (cfg.name or default_run_name(cfg)))
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    it = iter(source)

    resume_from = ckpt.latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and resume_from is None and rank == 0:
        print(f"no complete checkpoint in {run_dir}/checkpoints; starting from scratch")
    if resume_from is not None:
        tensors, meta = ckpt.load_checkpoint(resume_from)
        check_resume_config(meta.get("config", {}), to_dict(cfg), resume_from)
        sae_cfg = from_dict(SAEConfig, meta["sae"])
        sae = SparseAutoencoder(sae_cfg, device=device)
        sae.load_state_dict({k[len("sae."):]: v for k, v in tensors.items() if k.startswith("sae.")})
        start_step, tokens_seen = meta["step"], meta["tokens"]
        since_fired = tensors["since_fired"].to(device)
        if hasattr(source, "load_state_dict"):
            source.load_state_dict(meta["cursors"][rank])
            it = iter(source)
        first = None
    else:
        first = next(it)
        sae_cfg = from_dict(SAEConfig, {**to_dict(cfg.sae), "d_in": first.acts.shape[1],
                                        "hook_name": cfg.sae.hook_name or cfg.hook_name})
        sae = SparseAutoencoder(sae_cfg, device=device)
        sae.reset_parameters(seed=cfg.seed)
        stats = source.stats() if hasattr(source, "stats") else None
        var_total = float(stats["var"].sum()) if stats is not None else None
        sample = first.acts.to(device)
        if world > 1:  # initialise on the global first batch, as one process would
            parts = [torch.empty_like(sample) for _ in range(world)]
            dist.all_gather(parts, sample)
            sample = torch.cat(parts)
        sae.init_from_data_(sample, mean_sq_norm=stats and stats["mean_sq_norm"], var_total=var_total)
        if world > 1:  # and every rank holds exactly rank 0's parameters
            for t in [*sae.parameters(), sae.loss_normalizer]:
                dist.broadcast(t.data, 0)
            scale = torch.tensor([sae.cfg.input_scale], dtype=torch.float64)
            dist.broadcast(scale, 0)
            sae.cfg.input_scale = float(scale)
        start_step, tokens_seen = 0, 0
        since_fired = torch.zeros(sae_cfg.n_latents, dtype=torch.long, device=device)

    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    base_lr = cfg.lr or 2e-4 / math.sqrt(sae_cfg.n_latents / 2 ** 14)
    opt = make_optimizer(sae, base_lr, cfg)
    if resume_from is not None:
        ckpt.optimizer_from_flat(opt, tensors, meta["optimizer"])
        ckpt.set_rng_state(tensors, device)
    threshold = cfg.dead_tokens or min(10_000_000, max(cfg.batch_size * world, cfg.tokens // 4))
    steps = max(1, cfg.tokens // (cfg.batch_size * world))
    log = MetricsLog(run_dir / "metrics.jsonl", start_step if resume_from is not None else None, rank == 0)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")
    t_last, tok_last = time.perf_counter(), tokens_seen
    last: dict = {}
    accum: dict[str, float] = {}
    n_accum = 0

    def save(step: int) -> None:
        cursors = [source.state_dict() if hasattr(source, "state_dict") else None]
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, cursors[0])
            cursors = gathered
        if rank != 0:
            return
        # the SAE's whole state_dict: parameters and buffers (loss normaliser, an architecture's thresholds)
        tensors = {f"sae.{n}": t.detach() for n, t in sae.state_dict().items()}
        tensors["since_fired"] = since_fired
        tensors.update(ckpt.rng_state(device))
        opt_tensors, opt_meta = ckpt.optimizer_to_flat(opt)
        tensors.update(opt_tensors)
        meta = {"step": step, "tokens": tokens_seen, "sae": to_dict(sae.cfg), "optimizer": opt_meta,
                "cursors": cursors, "config": to_dict(cfg)}
        ckpt.save_checkpoint(run_dir, step, tensors, meta, keep=cfg.keep_checkpoints)

    try:
        for step in range(start_step, steps):
            batch = first if (step == start_step and first is not None) else next(it)
            x = batch.acts.to(device, non_blocking=True)
            grad = batch.grads.to(device) if getattr(batch, "grads", None) is not None else None
            if grad is None and sae.arch.needs_grads:
                from saelab.errors import ConfigError

                raise ConfigError(f"architecture {sae.arch.name!r} selects with the LM-loss gradient, but the "
                                  f"training batches carry none",
                                  hint="train from a cache written with `saelab cache --with-grads`, or stream "
                                       "(`--source stream`), which computes them")
            dead_mask = since_fired > threshold
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, cfg, base_lr)
            out = sae(x, grad=grad, dead_mask=dead_mask)
            loss = out.losses["loss"]
            if not torch.isfinite(loss):
                from saelab.errors import TrainingError

                raise TrainingError(
                    f"loss is {loss.item()} at step {step}",
                    hint=f"check the activations for NaN/inf (`saelab cache verify`), or lower --lr (now "
                         f"{base_lr:.2e}); the last checkpoint is intact, rerun with --resume")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                for p in sae.parameters():
                    if p.grad is not None:  # an architecture may leave a parameter untrained (MP's tied encoder)
                        dist.all_reduce(p.grad)
                        p.grad /= world
            sae.remove_parallel_grad_()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
            opt.step()
            sae.normalize_decoder_()
            sae.after_step(out, step)

            with torch.no_grad():
                fired = torch.zeros_like(since_fired, dtype=torch.bool)
                fired[out.code.indices[out.code.values != 0]] = True  # active means value != 0
                if world > 1:
                    f = fired.to(torch.uint8)
                    dist.all_reduce(f, op=dist.ReduceOp.MAX)
                    fired = f.bool()
                since_fired += x.shape[0] * world
                since_fired[fired] = 0
            tokens_seen += x.shape[0] * world

            for name, value in out.losses.items():
                accum[name] = accum.get(name, 0.0) + float(value.detach())
            accum["l0"] = accum.get("l0", 0.0) + float(out.code.l0().float().mean())
            n_accum += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == steps:
                now = time.perf_counter()
                last = {k: v / n_accum for k, v in accum.items()}
                last.update(step=done, tokens=tokens_seen, lr=opt.param_groups[0]["lr"],
                            dead_pct=100.0 * float((since_fired > threshold).float().mean()),
                            tokens_per_s=(tokens_seen - tok_last) / max(now - t_last, 1e-9))
                log.write(last)
                accum, n_accum, t_last, tok_last = {}, 0, now, tokens_seen
                if bar is not None:
                    bar.set_postfix(fvu=f"{last['fvu']:.4f}", l0=f"{last['l0']:.1f}", dead=f"{last['dead_pct']:.1f}%",
                                    tok_s=f"{last['tokens_per_s']:,.0f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == steps:
                save(done)
    finally:
        if bar is not None:
            bar.close()
        log.close()

    def draw():  # more training activations for the architecture's calibration (None once the source is spent)
        batch = next(it, None)
        return None if batch is None else batch.acts.to(device)

    calibration = sae.arch.calibrate(sae, draw)  # e.g. BatchTopK's θ fitted to the finished SAE
    if calibration and rank == 0:
        print(f"calibrated {sae.arch.name} inference: " + ", ".join(f"{k} {v:.4g}" for k, v in calibration.items()))
    if rank == 0:
        sae.save(run_dir / "sae", extra={"training": {"steps": steps, "tokens": tokens_seen, "calibration": calibration,
                                                      "dead_token_threshold": threshold,
                                                      "dead_latents": int((since_fired > threshold).sum()),
                                                      "final_metrics": last},
                                         "train_config": to_dict(cfg)})
    return TrainResult(run_dir, sae, steps, tokens_seen, last)
