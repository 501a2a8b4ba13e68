"""The training loop: batches → SAE → losses → Adam, with the decoder-norm constraint, dead-latent tracking
(in tokens), AuxK, gradient clipping, a metrics log, atomic checkpoints and bit-exact resume, and
`torch.distributed` data parallelism (launch with `torchrun`; gloo on CPU, NCCL on GPU: `saelab.distributed`), and
experiment tracking (`cfg.wandb`: `tracking.WandbRun`, rank 0 only).

`train(cfg, source)` takes any iterable of `Batch` (an `ActivationCache`, `stream_activations`, in-memory
activations); it neither knows nor cares where they come from. `train_many(cfgs, run_dirs, source)` trains several
SAEs on the same batches (a sweep, `saelab.training.sweep`); `train` is its case of one: one `SAERun` per SAE, one
step body.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from saelab.config import SAEConfig, TrainConfig, flatten, from_dict, save_config, to_dict
from saelab.distributed import all_or_none, rank_world
from saelab.models.loading import hook_layer
from saelab.rundir import RunDir
from saelab.sae import SparseAutoencoder
from saelab.sae.latent_shard import total_latents
from saelab.sae.saelens import run_metadata
from saelab.training import checkpoint as ckpt
from saelab.training.latent_parallel import make_grid
from saelab.training.memory import check_step_fits


@dataclass
class TrainResult:
    run_dir: Path
    sae: SparseAutoencoder
    steps: int
    tokens: int
    last: dict  # the last logged metrics
    tracker: object | None = None  # the SAE's open wandb run (rank 0, cfg.wandb), for the closing evaluation

    def close_tracking(self, evaluation: dict | None = None) -> None:
        """Log the closing evaluation (core metrics, as a dict) to the run's wandb run, if any, and finish it."""
        if self.tracker is not None:
            self.tracker.finish(evaluation)
            self.tracker = None


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
               "model.device", "source", "cache", "wandb"}


def saelens_run_metadata(cfg: TrainConfig | None, sae) -> dict:
    """The SAELens metadata of the run that trained `sae`, which the SAE cannot know (`SparseAutoencoder.save`'s
    `metadata`): its hook's block in the model and, from the run's config when there is one, the context size and
    the dataset."""
    return {**run_metadata(to_dict(cfg) if cfg is not None else None), "hook_layer": hook_layer(sae.cfg.hook_name)}


def check_resume_config(saved: dict, new: dict, where) -> None:
    """Refuse to resume a run with settings that would change it (tokens, batch size, architecture, k, lr, …)."""
    from saelab.errors import ConfigError

    # an architecture's options are compared whole: which keys they have depends on the architecture
    a, b = flatten(saved, whole=("sae.options",)), flatten(new, whole=("sae.options",))
    for key in sorted(set(a) | set(b)):
        if key in RESUME_FREE or key.split(".")[0] in RESUME_FREE:
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)):
            va, vb = list(va), list(vb)
        if va != vb:
            raise ConfigError(f"--resume: {key} was {va!r} in the checkpoint ({where}) but is {vb!r} now",
                              hint="resume with the run's own settings (its config.yaml), or start a new run "
                                   "with another --out")


def make_optimizer(sae: SparseAutoencoder, lr: float, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over the SAE's parameters; the multi-tensor (foreach) step, or the fused kernel on CUDA, instead of
    one small kernel per parameter and per operation. A parameter the architecture gives its own learning-rate
    factor (`lr_scales`, e.g. JumpReLU's thresholds) is a group of its own, whose "lr_scale" the schedule keeps."""
    fused = sae.W_dec.is_cuda
    scales = sae.arch.lr_scales()
    named = dict(sae.named_parameters())
    groups = [{"params": [p for name, p in named.items() if name not in scales]}]
    groups += [{"params": [named[name]], "lr": lr * f, "lr_scale": f} for name, f in scales.items()]
    return torch.optim.Adam(groups, lr=lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                            fused=fused or None, foreach=None if fused else True)


def default_run_name(cfg: TrainConfig) -> str:
    model = Path(cfg.model.name).name.replace("/", "_")
    hooks = cfg.sae.hook_name + (f"-to-{cfg.sae.target_hook}" if cfg.sae.target_hook else "")  # a transcoder's two
    return f"{model}-{hooks}-{cfg.sae.architecture}{'-skip' if cfg.sae.skip else ''}-k{cfg.sae.k}"


class SAERun:
    """One SAE's training: its model, optimizer, dead-latent counters, torch RNG stream, metrics log and run folder.
    `train_many` steps several on the same batches; `train` is the case of one, so there is one step body.

    Each run keeps its own RNG state (seeded with its `cfg.seed`, as a lone run is) and swaps it in around its own
    work, so an architecture that draws random numbers (Matryoshka's sampled prefixes) gets the stream it would get
    alone, whatever the other SAEs of a sweep draw."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, device: str | torch.device, label: str = "",
                 group: str | None = None):
        self.cfg, self.run_dir, self.device, self.label, self.group = cfg, Path(run_dir), device, label, group
        self.dir = RunDir(self.run_dir)
        self.rank, self.world = rank_world()
        # latent-parallel training (cfg.shard_latents): `world` counts the distinct batches of a step, and the
        # data-parallel reductions run over `data_group`, the processes holding the same shard (None: all)
        self.grid, self.data_group = make_grid(cfg), None
        if self.grid is not None:
            self.world, self.data_group = self.grid.batches, self.grid.data_group
        self.tracker = None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        outer = ckpt.rng_state(device)
        torch.manual_seed(cfg.seed)
        self.rng = ckpt.rng_state(device)
        ckpt.set_rng_state(outer, device)
        self.last: dict = {}
        self.accum: dict[str, float] = {}
        self.n_accum = 0

    @contextmanager
    def own_rng(self):
        outer = ckpt.rng_state(self.device)
        ckpt.set_rng_state(self.rng, self.device)
        try:
            yield
        finally:
            self.rng = ckpt.rng_state(self.device)
            ckpt.set_rng_state(outer, self.device)

    def init(self, first: torch.Tensor, stats: dict | None, target: torch.Tensor | None = None,
             target_stats: dict | None = None) -> None:
        """A new SAE, initialised from the first batch (already on the device) and the source's statistics; a
        transcoder also from the batch's target rows and their statistics."""
        cfg, device, world = self.cfg, self.device, self.world
        with self.own_rng():
            widths = {"d_in": first.shape[1], **({"d_out": target.shape[1]} if cfg.sae.target_hook else {})}
            sae_cfg = from_dict(SAEConfig, {**to_dict(cfg.sae), **widths})
            with all_or_none():  # before the first step rather than killed for memory in it (a cache's run: resolve)
                check_step_fits(sae_cfg, first.shape[0], cfg.shard_latents, device)
            if self.grid is None:
                sae = SparseAutoencoder(sae_cfg, device=device)
            else:
                with all_or_none():  # e.g. a width that does not split into equal shards
                    sae = self.grid.local_sae(sae_cfg, device)
            sae.reset_parameters(seed=cfg.seed)
            var_total = float(stats["var"].sum()) if stats is not None else None
            sample = first
            if world > 1:  # initialise on the global first batch, as one process would
                parts = [torch.empty_like(sample) for _ in range(world)]
                dist.all_gather(parts, sample, group=self.data_group)
                sample = torch.cat(parts)
                if target is not None:
                    parts = [torch.empty_like(target) for _ in range(world)]
                    dist.all_gather(parts, target, group=self.data_group)
                    target = torch.cat(parts)
            tstats = target_stats and {"mean_sq_norm": target_stats["mean_sq_norm"],
                                       "var_total": float(target_stats["var"].sum())}
            sae.init_from_data_(sample, mean_sq_norm=stats and stats["mean_sq_norm"], var_total=var_total,
                                target=target, target_stats=tstats)
            if world > 1:  # and every rank holds exactly rank 0's parameters
                for t in [*sae.parameters(), sae.loss_normalizer]:
                    dist.broadcast(t.data, group=self.data_group, group_src=0)
                scales = torch.tensor([sae.cfg.input_scale, sae.cfg.target_scale], dtype=torch.float64, device=device)
                dist.broadcast(scales, group=self.data_group, group_src=0)
                sae.cfg.input_scale, sae.cfg.target_scale = float(scales[0]), float(scales[1])
        self.sae, self.start_step, self.tokens_seen = sae, 0, 0
        self.since_fired = torch.zeros(sae.cfg.n_latents, dtype=torch.long, device=device)
        self.opt = make_optimizer(sae, self._base_lr(), cfg)
        self._open(resumed=False)

    def resume(self, step: int) -> dict:
        """The state saved at checkpoint `step`; returns its metadata (the source's cursors)."""
        path = ckpt.checkpoint_steps(self.run_dir)[step]
        tensors, meta = ckpt.load_checkpoint(path, shard=self.grid.shard if self.grid is not None else 0)
        # a checkpoint of an earlier saelab may name the hook at the top level too
        check_resume_config(TrainConfig._migrate(dict(meta.get("config", {}))), to_dict(self.cfg), path)
        with self.own_rng():
            sae_cfg = from_dict(SAEConfig, meta["sae"])
            sae = SparseAutoencoder(sae_cfg, device=self.device) if self.grid is None else \
                self.grid.local_sae(sae_cfg, self.device)
        sae.load_state_dict({k[len("sae."):]: v for k, v in tensors.items() if k.startswith("sae.")})
        self.sae, self.start_step, self.tokens_seen = sae, meta["step"], meta["tokens"]
        self.since_fired = tensors["since_fired"].to(self.device)
        self.opt = make_optimizer(sae, self._base_lr(), self.cfg)
        ckpt.optimizer_from_flat(self.opt, tensors, meta["optimizer"])
        self.rng = {k: v for k, v in tensors.items() if k.startswith("rng")}
        self._open(resumed=True)
        return meta

    def _base_lr(self) -> float:
        return self.cfg.lr or 2e-4 / math.sqrt(total_latents(self.sae) / 2 ** 14)

    def _open(self, resumed: bool) -> None:
        cfg = self.cfg
        if self.rank == 0:
            save_config(cfg, self.dir.config)
        self.base_lr = self._base_lr()
        self.threshold = cfg.dead_tokens or min(10_000_000, max(cfg.batch_size * self.world, cfg.tokens // 4))
        self.steps = max(1, cfg.tokens // (cfg.batch_size * self.world))
        self.log = MetricsLog(self.dir.metrics, self.start_step if resumed else None, self.rank == 0)
        if cfg.wandb and self.rank == 0:
            from saelab.training.tracking import WandbRun

            self.tracker = WandbRun(cfg.wandb, cfg.name or self.run_dir.name,
                                    {**to_dict(cfg), "sae": to_dict(self.sae.cfg), "world_size": self.world,
                                     "resumed_from_step": self.start_step if resumed else None}, group=self.group)
        self.t_last, self.tok_last = time.perf_counter(), self.tokens_seen
        self.busy = 0.0  # seconds in this SAE's own steps since the last log line (a sweep's other SAEs excluded)

    def step(self, step: int, x: torch.Tensor, grad: torch.Tensor | None, target: torch.Tensor | None = None) -> None:
        """One optimizer step on the batch `x` (on the device) and its LM-loss gradient, if the batch carries one;
        `target`: the batch's target rows (a transcoder's loss is against them)."""
        sae, opt, cfg, world = self.sae, self.opt, self.cfg, self.world
        if not sae.arch.needs_grads:
            grad = None  # as a lone run of this architecture reads the batches (without gradients)
        elif grad is None:
            from saelab.errors import ConfigError

            raise ConfigError(f"architecture {sae.arch.name!r}{self.label} selects with the LM-loss gradient, but "
                              f"the training batches carry none",
                              hint="train from a cache written with `saelab cache --with-grads`, or stream "
                                   "(`--source stream`), which computes them")
        t_step = time.perf_counter()
        with self.own_rng():
            dead_mask = self.since_fired > self.threshold
            for g in opt.param_groups:
                g["lr"] = lr_at(step, self.steps, cfg, self.base_lr) * g.get("lr_scale", 1.0)
            sae.arch.begin_step(step, self.steps)  # e.g. a penalty's warm-up
            out = sae(x, grad=grad, dead_mask=dead_mask, target=target if sae.cfg.target_hook else None)
            loss = out.losses["loss"]
            if not torch.isfinite(loss):
                from saelab.errors import TrainingError

                raise TrainingError(
                    f"loss is {loss.item()} at step {step}{self.label}",
                    hint=f"check the activations for NaN/inf (`saelab cache verify`), or lower --lr (now "
                         f"{self.base_lr:.2e}); the last checkpoint is intact, rerun with --resume")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.grid is not None:
                self.grid.reduce_grads(sae)
            elif world > 1:
                for p in sae.parameters():
                    if p.grad is not None:  # an architecture may leave a parameter untrained (MP's tied encoder)
                        dist.all_reduce(p.grad)
                        p.grad /= world
            sae.remove_parallel_grad_()
            if cfg.grad_clip > 0 and self.grid is not None:
                self.grid.clip_grad_norm_(sae, cfg.grad_clip)
            elif cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
            opt.step()
            sae.normalize_decoder_()
            sae.after_step(out, step)

        since_fired = self.since_fired
        with torch.no_grad():
            fired = torch.zeros_like(since_fired, dtype=torch.bool)
            fired[out.code.indices[out.code.values != 0]] = True  # active means value != 0
            if world > 1:
                f = fired.to(torch.uint8)
                dist.all_reduce(f, op=dist.ReduceOp.MAX, group=self.data_group)
                fired = f.bool()
            since_fired += x.shape[0] * world
            since_fired[fired] = 0
        self.tokens_seen += x.shape[0] * world
        self.busy += time.perf_counter() - t_step

        for name, value in out.losses.items():
            self.accum[name] = self.accum.get(name, 0.0) + float(value.detach())
        self.accum["l0"] = self.accum.get("l0", 0.0) + self._mean_l0(out.code)
        self.n_accum += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == self.steps:
            now = time.perf_counter()
            last = {k: v / self.n_accum for k, v in self.accum.items()}
            last.update(step=done, tokens=self.tokens_seen, lr=opt.param_groups[0]["lr"],
                        dead_pct=100.0 * self._dead() / total_latents(sae),
                        tokens_per_s=(self.tokens_seen - self.tok_last) / max(now - self.t_last, 1e-9),
                        sae_tokens_per_s=(self.tokens_seen - self.tok_last) / max(self.busy, 1e-9))
            self.log.write(last)
            if self.tracker is not None:
                self.tracker.log(last)
            self.last, self.accum, self.n_accum, self.t_last, self.tok_last = last, {}, 0, now, self.tokens_seen
            self.busy = 0.0

    def save(self, step: int, cursors: list) -> None:
        """A checkpoint at `step` (rank 0; latent-parallel: the shards of batch 0), not pruning older ones: the loop
        prunes once every SAE has saved."""
        if self.rank != 0 and (self.grid is None or self.grid.batch != 0):
            return
        # the SAE's whole state_dict: parameters and buffers (loss normaliser, an architecture's thresholds)
        tensors = {f"sae.{n}": t.detach() for n, t in self.sae.state_dict().items()}
        tensors["since_fired"] = self.since_fired
        tensors.update(self.rng)
        opt_tensors, opt_meta = ckpt.optimizer_to_flat(self.opt)
        tensors.update(opt_tensors)
        sae_cfg = self.sae.cfg if self.grid is None else self.grid.full_config(self.sae.cfg)
        meta = {"step": step, "tokens": self.tokens_seen, "sae": to_dict(sae_cfg), "optimizer": opt_meta,
                "cursors": cursors, "config": to_dict(self.cfg)}
        if self.grid is not None:
            self.grid.save_checkpoint(self.run_dir, step, tensors, meta)
        else:
            ckpt.save_checkpoint(self.run_dir, step, tensors, meta, keep=None)

    def _mean_l0(self, code) -> float:
        """Active latents per token (of every shard's latents)."""
        if self.grid is None:
            return float(code.l0().float().mean())
        return float(self.grid.count(code.l0().sum())) / code.values.shape[0]

    def _dead(self) -> int:
        """Dead latents (of every shard)."""
        dead = (self.since_fired > self.threshold).sum()
        return int(dead if self.grid is None else self.grid.count(dead))

    def finish(self, draw) -> TrainResult:
        """Calibrate the architecture's inference state on `draw()`n training batches and save the SAE."""
        sae, rank = self.sae, self.rank
        with self.own_rng():
            calibration = sae.arch.calibrate(sae, draw)  # e.g. BatchTopK's θ fitted to the finished SAE
        if calibration and rank == 0:
            print(f"calibrated {sae.arch.name} inference{self.label}: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in calibration.items()))
        training = {"steps": self.steps, "tokens": self.tokens_seen, "calibration": calibration,
                    "dead_token_threshold": self.threshold,
                    "dead_latents": self._dead()}
        if self.grid is not None:  # the whole SAE, on rank 0
            sae = self.grid.gather_sae(sae) or sae
        if rank == 0:
            sae.save(self.dir.sae,
                     extra={"training": {**training, "final_metrics": self.last}, "train_config": to_dict(self.cfg)},
                     metadata=saelens_run_metadata(self.cfg, sae))
        if self.tracker is not None:
            self.tracker.summarize(training, "train/")
        return TrainResult(self.run_dir, sae, self.steps, self.tokens_seen, self.last, self.tracker)


class CalibrationDraws:
    """Training batches after the last step, for the architectures' calibration: every SAE gets the same ones, in
    the order a lone run would draw them; each is read once and, with several SAEs, kept for the next one."""

    def __init__(self, it, device, keep: bool):
        self.it, self.device, self.keep, self.drawn = it, device, keep, []

    def for_run(self):
        i = 0

        def draw():  # the next batch's activations (None once the source is spent)
            nonlocal i
            if not self.keep:
                batch = next(self.it, None)
                return None if batch is None else batch.acts.to(self.device)
            if i == len(self.drawn):
                batch = next(self.it, None)
                self.drawn.append(None if batch is None else batch.acts.to(self.device))
            i += 1
            return self.drawn[i - 1]

        return draw


def common_checkpoint_step(run_dirs: list[Path]) -> int | None:
    """The newest checkpoint step that every run holds (a kill between two SAEs' saves leaves one a step ahead)."""
    common = set.intersection(*(set(ckpt.checkpoint_steps(d)) for d in run_dirs))
    return max(common) if common else None


def _cursors(source, world: int) -> list:
    """The source's position on every rank (each rank's own source), for the checkpoint."""
    cursors = [source.state_dict() if hasattr(source, "state_dict") else None]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, cursors[0])
        cursors = gathered
    return cursors


def _show(bar, lasts: list[dict]) -> None:
    """The progress bar's metrics, one value per SAE ("0.0812/0.0771" for a sweep of two)."""
    nan = float("nan")
    bar.set_postfix(fvu="/".join(f"{m.get('fvu', nan):.4f}" for m in lasts),
                    l0="/".join(f"{m.get('l0', nan):.1f}" for m in lasts),
                    dead="/".join(f"{m.get('dead_pct', nan):.1f}%" for m in lasts),
                    tok_s=f"{lasts[-1].get('tokens_per_s', nan):,.0f}", refresh=False)


def train_many(cfgs: list[TrainConfig], run_dirs: list[str | Path], source: Iterable, progress: bool = True,
               device: str | torch.device = "cpu", labels: list[str] | None = None) -> list[TrainResult]:
    """Train several SAEs on the same batches: the source is read (and shuffled) once, each batch goes to every SAE
    in turn; each SAE has its own optimizer, RNG stream, run folder, checkpoints and metrics. They must share what
    decides the batches and the schedule of steps and checkpoints (`saelab.training.sweep` checks it): tokens,
    batch_size, seed, checkpoint_every, keep_checkpoints, resume, threads. Each SAE ends bit-identical to the same
    SAE trained alone on these batches. With `cfg.wandb`, each SAE's wandb run is left open for the closing
    evaluation (`TrainResult.close_tracking`), or finished as failed if training raises."""
    cfg = cfgs[0]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    group = Path(run_dirs[0]).parent.name if len(cfgs) > 1 else None  # a sweep's SAEs: one wandb group
    runs = [SAERun(c, Path(d), device, label, group)
            for c, d, label in zip(cfgs, run_dirs, labels or [""] * len(cfgs))]
    try:
        return _train_runs(runs, cfg, source, progress, device)
    except BaseException:
        for r in runs:
            if r.tracker is not None:
                r.tracker.finish(failed=True)
        raise


def _train_runs(runs: list[SAERun], cfg: TrainConfig, source: Iterable, progress: bool,
                device: str | torch.device) -> list[TrainResult]:
    """`train_many`'s loop: initialise (or resume), step every SAE on each batch, checkpoint, calibrate, save."""
    rank, world = rank_world()
    it = iter(source)

    start = common_checkpoint_step([r.run_dir for r in runs]) if cfg.resume else None
    if cfg.resume and start is None and rank == 0:
        print(f"no complete checkpoint in {' / '.join(str(r.run_dir) for r in runs)}/checkpoints (common to every "
              f"SAE); starting from scratch" if len(runs) > 1 else
              f"no complete checkpoint in {runs[0].run_dir}/checkpoints; starting from scratch")
    first = None
    if start is not None:
        metas = [r.resume(start) for r in runs]
        if hasattr(source, "load_state_dict"):
            source.load_state_dict(metas[0]["cursors"][rank])
            it = iter(source)
    else:
        first, start = next(it), 0
        stats = source.stats() if hasattr(source, "stats") else None
        sample = first.acts.to(device)
        target = getattr(first, "targets", None)  # a transcoder's (sae.target_hook)
        target = None if target is None else target.to(device)
        tstats = source.target_stats() if target is not None and hasattr(source, "target_stats") else None
        if target is None and cfg.sae.target_hook:
            from saelab.errors import ConfigError

            raise ConfigError(f"sae.target_hook is {cfg.sae.target_hook!r}, but the training batches carry no target "
                              f"activations", hint="read a cache or stream with the target hook (target_hook=), as "
                                                   "`saelab train --target-hook` does")
        for r in runs:
            r.init(sample, stats, target, tstats)
    steps = runs[0].steps
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True, desc="train")
    try:
        for step in range(start, steps):
            batch = first if (step == start and first is not None) else next(it)
            x = batch.acts.to(device, non_blocking=True)
            grad = batch.grads.to(device) if getattr(batch, "grads", None) is not None else None
            target = batch.targets.to(device) if getattr(batch, "targets", None) is not None else None
            for r in runs:
                r.step(step, x, grad, target)
            done = step + 1
            if bar is not None:
                if done % cfg.log_every == 0 or done == steps:
                    _show(bar, [r.last for r in runs])
                bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == steps:
                cursors = _cursors(source, world)
                for r in runs:
                    r.save(done, cursors)
                if rank == 0:  # pruned only now: every SAE holds the newest checkpoint before an older one goes
                    for r in runs:
                        ckpt.prune_checkpoints(r.run_dir, cfg.keep_checkpoints)
    finally:
        if bar is not None:
            bar.close()
        for r in runs:
            if hasattr(r, "log"):
                r.log.close()

    draws = CalibrationDraws(it, device, keep=len(runs) > 1)
    return [r.finish(draws.for_run()) for r in runs]


def train(cfg: TrainConfig, source: Iterable, run_dir: str | Path | None = None, progress: bool = True,
          device: str | torch.device = "cpu") -> TrainResult:
    """Train one SAE. The source yields `Batch`es of `cfg.batch_size` rows per process; with `torchrun`, each rank
    passes its own disjoint source and the global batch is `world_size × batch_size`."""
    run_dir = Path(run_dir or cfg.out or Path("runs") / (cfg.name or default_run_name(cfg)))
    return train_many([cfg], [run_dir], source, progress=progress, device=device)[0]
