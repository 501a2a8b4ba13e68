"""One small config dataclass per command, validated when built, loadable from YAML/JSON, overridable by flags.

`load_config(TrainConfig, "run.yaml", overrides={"k": 64})` reads a file, applies flag overrides on top and
builds the dataclass; any invalid value raises one `ConfigError` that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from saelab.data.corpus import CorpusSpec
from saelab.settings import CountError, TextError, check, parse_count, setting

T = TypeVar("T")
DTYPES = ("float32", "float16", "bfloat16")
MIDDLE_HOOK = "the middle residual stream, blocks.{L//2}.hook_resid_pre"  # how `--help` names the default hook


from saelab.errors import ConfigError  # noqa: E402  (re-exported: `from saelab.config import ConfigError` works)


@dataclass
class ModelSpec:
    """Which language model: 'reference' (embedded), a hub name such as 'gpt2', or a local directory."""

    name: str = setting("reference", "'reference' (the embedded model), a hub name such as gpt2, or a local model "
                                     "directory", flag="--model")
    device: str = setting("cpu", "cpu, cuda[:N] or auto")
    dtype: str = setting("float32", "float32, float16 or bfloat16", flag="--model-dtype")

    def __post_init__(self):
        check(bool(self.name), "model.name", "must be 'reference', a hub name or a local path")
        check(self.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        check(self.device == "cpu" or self.device.startswith(("cuda", "mps")) or self.device == "auto",
              "model.device", f"must be cpu, cuda[:N], mps or auto, got {self.device!r}")

    def resolved_device(self) -> str:
        """The device to run on: 'auto' picks cuda when there is one; a CUDA or MPS device that this machine does
        not have is a `ConfigError` here, before anything is loaded."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda"):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            try:
                index = torch.device(self.device).index or 0
            except RuntimeError:  # 'cuda:x', 'cuda1'
                raise ConfigError(f"device {self.device!r} is not a device name", hint="use cpu, cuda, cuda:N or auto")
            if index >= count:
                have = f"it has {count} CUDA device{'s' if count != 1 else ''}" if count else "it has no CUDA device"
                raise ConfigError(f"device {self.device!r} does not exist on this machine: {have}",
                                  hint="use --device cpu, auto" + (f" or cuda:0..cuda:{count - 1}" if count else ""))
        if self.device == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("device 'mps' is not available on this machine", hint="use --device cpu or auto")
        return self.device


@dataclass
class CacheConfig:
    """`saelab cache`: activations of several hooks from one model pass, written as an on-disk cache.

    Everything except `tokens` (the target size; a larger one extends a finished cache) and `out` identifies the
    cache: rerunning with a different value against an existing directory is refused, naming what differs.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    hooks: list[str] = setting([], "comma-separated hook names; all are captured in one forward pass",
                               default_text=MIDDLE_HOOK)
    out: str = setting("", "cache directory; rerunning resumes or extends it", default_text="cache/<model>-<hook>")
    # the target size in tokens (BOS included), rounded up to whole rows
    tokens: int = setting(1_000_000, "cache size in tokens, e.g. 2M, 500k or 20000; a larger value later extends "
                                     "the cache", parse=parse_count)
    context_size: int = setting(128, "tokens per packed row, BOS included")
    split: str = setting("train", "corpus split: train, validation or all")
    dtype: str = setting("float32", "storage dtype: float32, float16 or bfloat16 (stored as raw bits, exact)")
    with_grads: bool = setting(False, "also store d(next-token cross-entropy, summed over predicted "
                                      "tokens)/d(activation) per hook, from one backward pass per batch (for "
                                      "gradient-TopK SAEs)")
    exclude_bos: bool = setting(True, "keep position 0 (BOS) as a training row (by default it is left out: its norm "
                                      "dwarfs the rest)", flag="--keep-bos", negate=True)
    batch_rows: int = setting(32, "rows per model forward")
    shard_rows: int = setting(0, "rows per shard, a multiple of --batch-rows", default_text="~64 MB files")

    def __post_init__(self):
        check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        check(self.tokens > 0, "tokens", f"must be > 0, got {self.tokens}")
        check(self.context_size >= 2, "context_size", f"must be >= 2, got {self.context_size}")
        check(self.split in ("train", "validation", "all"), "split",
              f"must be train, validation or all, got {self.split!r}")
        check(self.batch_rows >= 1, "batch_rows", f"must be >= 1, got {self.batch_rows}")
        check(self.shard_rows >= 0, "shard_rows", f"must be >= 0 (0: automatic), got {self.shard_rows}")
        check(self.shard_rows % self.batch_rows == 0, "shard_rows",
              f"must be a multiple of batch_rows ({self.batch_rows}), got {self.shard_rows}")
        check(len(set(self.hooks)) == len(self.hooks), "hooks", f"lists a hook twice: {self.hooks}")
        check(all(h and "/" not in h and not h.startswith(".") for h in self.hooks), "hooks",
              f"hook names must be non-empty, without '/' and not start with '.', got {self.hooks}")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(tp: Any, value: Any, path: str) -> Any:
    """Turn plain JSON/YAML values into `tp`, recursing into nested dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and not dataclasses.is_dataclass(value):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build(args[0], value, path) if len(args) == 1 else value
    if origin is list and isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:  # `--hooks ""`: a flag given empty is a mistake, not a request for the default
            raise ConfigError(f"{path}: empty ({value!r}); name at least one, comma-separated, or leave it out for "
                              f"the default")
        return items
    if origin is list and not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: must be a list (or a comma-separated string), got {value!r}")
    if origin is list and (typing.get_args(tp) or (None,))[0] is str:
        return [_scalar(str, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if tp in (bool, int, float, str):
        return _scalar(tp, value, path)
    return value


def _scalar(tp: type, value: Any, path: str) -> Any:
    """Check a scalar's type, accepting the spellings YAML and flags produce ("1e6" and 1e6 for an int)."""
    if isinstance(value, tp) and not (tp is not bool and isinstance(value, bool)):
        return value
    if tp is bool and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    if tp in (int, float) and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None:
            if tp is float:
                return number
            if number.is_integer():
                return int(number)
    raise ConfigError(f"{path}: must be {'an' if tp is int else 'a'} {tp.__name__}, got {value!r}")


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build a config dataclass from a dict; unknown keys are an error naming the key. A class may rename older
    keys first with a `_migrate(dict) -> dict` static method (configs saved by earlier saelab versions)."""
    if isinstance(data, dict):
        data = migrate(cls, data)
    types = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in {path}" if path else ""
        raise ConfigError(f"{path + '.' if path else ''}{unknown[0]}: unknown field{where}; valid fields are {sorted(names)}")
    kwargs = {k: _build(types[k], v, f"{path + '.' if path else ''}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def read_file(path: str | Path) -> dict:
    """A YAML (.yaml/.yml) or JSON (.json; any other suffix: JSON, else YAML) config file as a dict. Every problem
    is one `ConfigError` naming the file (and, for a syntax error, the line and column)."""
    import yaml

    path = Path(path)
    hint = "a config file is a YAML or JSON mapping of field names to values (see `saelab <command> --help`)"
    if not path.exists():
        raise ConfigError(f"{path}: no such config file", hint=hint)
    if path.is_dir():
        raise ConfigError(f"{path}: a directory, not a config file", hint=hint)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file, so not valid YAML/JSON", hint=hint) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None

    def yaml_error(e: yaml.YAMLError, kind: str) -> ConfigError:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1}: {getattr(e, 'problem', '') or 'syntax error'})" \
            if mark is not None else f" ({' '.join(str(e).split())})"
        return ConfigError(f"{path}: not valid {kind}{where}", hint=hint)

    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise yaml_error(e, "YAML") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            kind = "JSON" if path.suffix == ".json" else "YAML/JSON"
            bad = ConfigError(f"{path}: not valid {kind} (line {e.lineno}, column {e.colno}: {e.msg})", hint=hint)
            if path.suffix == ".json":
                raise bad from None
            try:  # neither .json nor .yaml: YAML is the other format it may be in
                data = yaml.safe_load(text)
            except yaml.YAMLError:
                raise bad from None
            if not isinstance(data, dict):
                raise bad from None
    if data is None:
        data = {}  # an empty file: all defaults
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of field names to values, got "
                          f"{type(data).__name__}", hint=hint)
    return data


def flatten(d: dict, prefix: str = "", whole: tuple[str, ...] = ()) -> dict:
    """A nested config dict as {dotted key: value}, for naming what differs between two of them; the mappings at
    the dotted keys in `whole` stay one value."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in whole:
            out.update(flatten(v, key + ".", whole))
        else:
            out[key] = v
    return out


def merge(base: dict, overrides: dict) -> dict:
    """Overrides win; nested dicts merge; dotted keys ('model.name') address nested fields."""
    out = json.loads(json.dumps(base))
    for key, value in overrides.items():
        if value is None:
            continue
        parts = key.split(".")
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: must be a mapping of fields, got {node!r}")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def migrate(cls: type, data: dict) -> dict:
    """`data` with the older keys a config class renames (its `_migrate`), so that overrides apply to the new ones."""
    return cls._migrate(dict(data)) if hasattr(cls, "_migrate") else data


def load_config(cls: type[T], path: str | Path | T | None = None, overrides: dict | None = None) -> T:
    """A `cls` from the YAML/JSON file at `path` (or from a `cls` already built, or from the defaults), with
    `overrides` ({dotted key: value}, e.g. from `saelab.settings.overrides_from_args`) applied on top."""
    if isinstance(path, cls):
        data, path = to_dict(path), None
    else:
        data = migrate(cls, read_file(path)) if path else {}
    try:
        return from_dict(cls, merge(data, overrides or {}))
    except ConfigError as e:
        if path and not e.hint:  # say where the value may have come from
            e.hint = f"the value comes from {path} or from a flag (flags override the file)"
        raise


def save_config(cfg: Any, path: str | Path) -> None:
    path = Path(path)
    data = to_dict(cfg)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=2))


__all__ = ["ConfigError", "ModelSpec", "CorpusSpec", "from_dict", "to_dict", "load_config", "save_config",
           "merge", "flatten", "read_file", "field"]


NORMALIZATIONS = ("none", "scale", "layer_norm", "constant_norm_rescale")
# --encoder-chunk auto: the dense encoder up to this width (at B 4,096 its [B, n] fp32 matrix is 1 GiB there, and
# streaming in 4,096-latent blocks measured 1.66x the dense step at n 16,384: bench/width.py), streaming beyond
AUTO_DENSE_LATENTS = 65_536
AUTO_CHUNK = 16_384


def parse_encoder_chunk(text: str) -> int:
    """--encoder-chunk: a number of latents, `auto` (-1) or `dense` (0)."""
    words = {"auto": -1, "dense": 0}
    if str(text).strip().lower() in words:
        return words[str(text).strip().lower()]
    try:
        chunk = parse_count(text)
    except CountError:
        chunk = -1
    if chunk < 0:
        raise TextError(f"not a number of latents, auto or dense: {text!r} (e.g. 16384, 16k, auto)")
    return chunk


def auto_encoder_chunk(architecture: str, n_latents: int) -> int:
    """What `--encoder-chunk auto` means for this SAE: dense (0) for architectures that cannot stream and up to
    AUTO_DENSE_LATENTS, blocks of AUTO_CHUNK latents beyond."""
    from saelab.sae.architectures import get_architecture  # the registry, imported when first needed

    if n_latents <= AUTO_DENSE_LATENTS or not get_architecture(architecture).streams:
        return 0
    return AUTO_CHUNK




@dataclass
class SAEConfig:
    """The SAE itself. `n_latents` 0 means `expansion_factor × d_in`, filled in when d_in is known.

    Fields here are common to every architecture; what only one architecture has lives in `options`, checked
    against that architecture's own small options dataclass (`saelab.sae.architectures`)."""

    # the registered architectures (`saelab.sae.architectures`); jumprelu is for inference only
    architecture: str = setting("topk", "`saelab train --arch NAME --help` lists its options", flag="--arch")
    d_in: int = 0
    n_latents: int = setting(0, "SAE width", default_text="16 × d_in")
    expansion_factor: int = setting(16, "width as a multiple of d_in when --n-latents is not given")
    k: int = setting(32, "active latents per token")
    hook_name: str = setting("", "hook to train on", flag="--hook", default_text=MIDDLE_HOOK)
    # a transcoder (`saelab.sae.transcoder`): the encoder reads hook_name, the decoder writes target_hook (d_out wide)
    target_hook: str = setting("", "train a transcoder: encode --hook, reconstruct this hook's activations of the same "
                                   "tokens (e.g. --hook blocks.2.hook_mlp_in --target-hook blocks.2.hook_mlp_out)",
                               default_text="none: an SAE")
    skip: bool = setting(False, "skip-transcoder (Paulo et al. 2025): add a linear term W_skip·x (zero at init) to the "
                                "transcoder's output; needs --target-hook")
    d_out: int = 0  # the target's width (a transcoder's; 0 for an SAE)
    target_scale: float = 1.0  # normalize "scale": the target's own fixed factor, E||ỹ||² = d_out
    model_name: str = "reference"
    # "scale": one fixed factor so that E||x||² = d_in (from cache statistics), folded into the weights at save;
    # "layer_norm": per-token (x − μ)/(σ + ln_eps) as in OpenAI's released SAEs, undone on output by x̂·σ + μ;
    # "constant_norm_rescale": per-token x·√d/||x|| (SAELens), undone on output; "none".
    normalize: str = setting("scale", "input normalisation: scale (folded at save), layer_norm or none")
    input_scale: float = 1.0
    ln_eps: float = 1e-5  # layer_norm: σ + ε on the way in only (OpenAI's and SAELens's convention)
    ln_unbiased: bool = True  # layer_norm: the unbiased σ, as SAELens, so SAELens reproduces our SAEs exactly
    # 0 means d_in // 2 (sparsify, dictionary_learning); OpenAI used 256, the paper ~512
    k_aux: int = setting(0, "AuxK latents", default_text="d_in // 2")
    aux_coef: float = setting(1 / 32, "AuxK loss coefficient", default_text="1/32")
    # saelab.kernels.topk_stream: the same codes, values and gradients as the dense path, bit for bit on CPU
    encoder_chunk: int = setting(-1, "streaming encoder: compute pre-activations this many latents at a time, keeping "
                                     "a running top-k per token (TopK, AbsTopK, g-SAE) or of the batch (BatchTopK, "
                                     "Matryoshka, mutual and feature choice) instead of the [batch, n_latents] "
                                     "matrix, in training and in encode; dense (or 0): one dense GEMM; auto: dense "
                                     f"up to {AUTO_DENSE_LATENTS:,} latents (where it is faster), blocks of "
                                     f"{AUTO_CHUNK:,} beyond (where the [batch, n] matrix outgrows memory)",
                                 parse=parse_encoder_chunk, default_text="auto", metavar="N|auto|dense")
    dtype: str = "float32"
    options: dict = field(default_factory=dict)  # the architecture's own options (see `saelab train --arch A --help`)

    @staticmethod
    def _migrate(data: dict) -> dict:
        """Before the architecture seam, TopK's own flags were top-level fields; they now live in `options`."""
        for key in ("multi_topk", "relu_before_topk"):
            if key in data:
                value = data.pop(key)
                if data.get("architecture", "topk") in ("topk", "gtopk"):
                    data["options"] = {key: value, **(data.get("options") or {})}
        return data

    def __post_init__(self):
        check(self.normalize in NORMALIZATIONS, "sae.normalize", f"must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        check(self.d_in >= 0, "sae.d_in", f"must be >= 0, got {self.d_in}")
        check(self.n_latents >= 0, "sae.n_latents", f"must be >= 0, got {self.n_latents}")
        check(self.expansion_factor >= 1, "sae.expansion_factor", f"must be >= 1, got {self.expansion_factor}")
        check(self.k >= 1, "sae.k", f"must be >= 1, got {self.k}")
        check(self.k_aux >= 0, "sae.k_aux", f"must be >= 0, got {self.k_aux}")
        check(self.aux_coef >= 0, "sae.aux_coef", f"must be >= 0, got {self.aux_coef}")
        check(self.encoder_chunk >= -1, "sae.encoder_chunk", f"must be a number of latents, auto (-1) or dense (0), "
                                                             f"got {self.encoder_chunk}")
        check(self.input_scale > 0 and self.input_scale == self.input_scale, "sae.input_scale",
              f"must be a positive number, got {self.input_scale}")
        check(self.ln_eps >= 0, "sae.ln_eps", f"must be >= 0, got {self.ln_eps}")
        check(self.target_scale > 0 and self.target_scale == self.target_scale, "sae.target_scale",
              f"must be a positive number, got {self.target_scale}")
        check(self.d_out >= 0, "sae.d_out", f"must be >= 0, got {self.d_out}")
        check(self.dtype in DTYPES, "sae.dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        self.options = check_options(self.architecture, self.options)
        from saelab.sae.transcoder import check_transcoder_config

        check_transcoder_config(self)
        if self.encoder_chunk > 0:
            from saelab.sae.architectures import NOT_STREAMED, get_architecture, streaming_architectures

            check(get_architecture(self.architecture).streams, "sae.encoder_chunk",
                  f"the streaming encoder is for top-k selections ({', '.join(streaming_architectures())}); "
                  f"{self.architecture} trains with the dense encoder (0): {NOT_STREAMED}")
        if self.d_in:
            if not self.n_latents:
                self.n_latents = self.expansion_factor * self.d_in
            check(self.k <= self.n_latents, "sae.k", f"must be <= n_latents ({self.n_latents}), got {self.k}")
            if self.encoder_chunk == -1:  # auto, decided once the width is known (and then recorded as a number)
                self.encoder_chunk = auto_encoder_chunk(self.architecture, self.n_latents)
            check(self.encoder_chunk <= self.n_latents, "sae.encoder_chunk",
                  f"must be <= n_latents ({self.n_latents}), got {self.encoder_chunk}")
            from saelab.sae.architectures import get_architecture  # the registry, imported when first needed

            get_architecture(self.architecture).check_config(self)  # options that depend on the width
            if not self.k_aux:
                self.k_aux = max(1, self.d_in // 2)


def check_options(architecture: str, options: dict | None) -> dict:
    """Validate an architecture's options against its own options dataclass (unknown keys and wrong types name the
    field), before any model is loaded; returns them complete, defaults filled in, as a plain dict."""
    from saelab.sae.architectures import get_architecture  # the registry, imported when first needed

    opts = from_dict(get_architecture(architecture).Options, dict(options or {}), path=f"sae.options[{architecture}]")
    return dataclasses.asdict(opts)


SOURCES = ("auto", "cache", "stream")


@dataclass
class TrainConfig:
    """`saelab train`: one SAE on one hook. Defaults train a TopK SAE (16×, k=32) on the reference model's
    middle residual stream over the standard-library corpus in a few minutes on 2 CPU cores."""

    model: ModelSpec = field(default_factory=ModelSpec)
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    sae: SAEConfig = field(default_factory=SAEConfig)
    out: str = setting("", "run directory", default_text="runs/<name>")
    name: str = setting("", "run name", default_text="<model>-<hook>-<arch>-k<k>")
    source: str = setting("auto", "auto: the --cache, else a cache made in the run directory; or stream")
    cache: str = setting("", "train from this existing activation cache", default_text="none")
    # when source=auto makes a cache: its size (several epochs over it are fine)
    cache_tokens: int = setting(1_000_000, "size of the cache made when none is given", parse=parse_count)
    context_size: int = setting(128, "tokens per row")
    # a first SAE in minutes on 2 cores (EV ~0.85)
    tokens: int = setting(2_000_000, "training tokens, e.g. 20M for a full-quality SAE; the default is a first look "
                                     "in ~4 minutes on 2 CPU cores", parse=parse_count)
    batch_size: int = setting(4096, "tokens per step per process")
    # 0 → Gao et al. Fig. 3's scaling, as sparsify and dictionary_learning
    lr: float = setting(0.0, "learning rate", default_text="2e-4 / sqrt(n_latents / 2^14)")
    lr_warmup_steps: int = 50
    lr_decay_fraction: float = 0.2  # linear decay to 0 over the last fraction of training
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 6.25e-10  # OpenAI's
    grad_clip: float = 1.0
    # latents silent this many tokens are dead (AuxK, metrics)
    dead_tokens: int = setting(0, "a latent silent this many tokens is dead", parse=parse_count,
                               default_text="min(10M, tokens/4)")
    seed: int = setting(0, "seed")
    log_every: int = 10
    checkpoint_every: int = setting(200, "steps between checkpoints")  # also at the end
    keep_checkpoints: int = 2
    resume: bool = setting(False, "continue from the run's last checkpoint")
    eval_tokens: int = setting(65_536, "held-out tokens for the final core metrics; 0 skips them", parse=parse_count)
    threads: int = setting(0, "torch CPU threads", default_text="torch's")
    # saelab.training.latent_parallel
    shard_latents: int = setting(0, "latent-parallel training under torchrun: split the SAE's latents (their weights "
                                    "and Adam state) over N processes that share each batch; W processes are W/N "
                                    "data-parallel groups of N; for topk and batchtopk; 0 or 1: off", metavar="N")
    # saelab.training.tracking
    wandb: str = setting("", "log to this Weights & Biases project: the config, the metrics of metrics.jsonl and the "
                             "closing core metrics, one wandb run per SAE (rank 0 under torchrun); "
                             "WANDB_MODE=offline writes them to disk for `wandb sync`", default_text="none")

    @staticmethod
    def _migrate(data: dict) -> dict:
        """Before one hook field, the hook was also a top-level `hook_name` (configs and sweep files of earlier
        saelab versions); it is the SAE's `sae.hook_name`."""
        if "hook_name" not in data:
            return data
        hook = data.pop("hook_name")
        sae = data.get("sae")
        if sae is not None and not isinstance(sae, dict) or not hook:
            return data
        sae = dict(sae or {})
        if sae.get("hook_name") and sae["hook_name"] != hook:
            raise ConfigError(f"sae.hook_name: {sae['hook_name']!r}, but hook_name is {hook!r}",
                              hint="give the hook once (--hook)")
        data["sae"] = {**sae, "hook_name": hook}
        return data

    def __post_init__(self):
        check(self.source in SOURCES, "source", f"must be one of {SOURCES}, got {self.source!r}")
        check(self.tokens > 0, "tokens", f"must be > 0, got {self.tokens}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        check(self.context_size >= 2, "context_size", f"must be >= 2, got {self.context_size}")
        check(self.lr >= 0, "lr", f"must be >= 0, got {self.lr}")
        check(0 <= self.lr_decay_fraction <= 1, "lr_decay_fraction", f"must be in [0, 1], got {self.lr_decay_fraction}")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        check(self.checkpoint_every > 0, "checkpoint_every", f"must be > 0, got {self.checkpoint_every}")
        check(self.source != "cache" or bool(self.cache), "cache", "source=cache needs --cache DIR")
        check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas",
              f"must be two numbers in [0, 1), got {self.adam_betas}")
        check(self.cache_tokens > 0, "cache_tokens", f"must be > 0, got {self.cache_tokens}")
        for name in ("dead_tokens", "eval_tokens", "threads", "seed", "lr_warmup_steps"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("log_every", "keep_checkpoints"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.shard_latents >= 0, "shard_latents", f"must be >= 0 (0 or 1: off), got {self.shard_latents}")
        if self.shard_latents > 1:
            from saelab.sae.architectures import get_architecture, latent_sharding, registry
            from saelab.sae.latent_shard import check_width

            able = sorted(name for name, arch in registry().items() if latent_sharding(arch))
            check(bool(latent_sharding(get_architecture(self.sae.architecture))), "shard_latents",
                  f"latent-parallel training covers {', '.join(able)}; {self.sae.architecture} trains on one "
                  f"process or data-parallel (drop --shard-latents)")
            check(not self.sae.target_hook, "shard_latents",
                  f"latent-parallel training splits SAEs; a transcoder (--target-hook {self.sae.target_hook}) has "
                  f"tensors it neither splits nor replicates (b_in, W_skip): train it on one process or "
                  f"data-parallel (drop --shard-latents)")
            check_width(self.sae.n_latents, self.sae.k, self.shard_latents)
