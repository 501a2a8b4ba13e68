"""SAELens's on-disk layout, both ways. Only safetensors and JSON are read; nothing is unpickled.

`save_sae` writes `cfg.json` + `sae_weights.safetensors` as SAELens 6 writes them (so `SAE.load_from_disk` loads
the folder, reproduces x̂ and keeps our metadata, and `ActivationsStore.from_sae` finds what it needs) plus
saelab's own `saelab.json` (the full config, training summary and metrics).

`read_sae_folder` and `load_weights` read saelab folders and SAELens-saved ones (TopK, JumpReLU, ReLU "standard" as
saelab's `relu`, Gated, and BatchTopK, which SAELens saves for inference as JumpReLU; the transcoders "transcoder",
"skip_transcoder", "jumprelu_transcoder" and "jumprelu_skip_transcoder" as saelab's relu / jumprelu transcoders).
A transcoder (`saelab.sae.transcoder`) is saved as SAELens's transcoder classes save one: W_dec [n, d_out],
b_dec [d_out], W_skip [d_out, d_in], cfg.json's d_out and metadata.hook_name_out (its target hook), no input
centring (b_in folded into the encoder bias), each side's fixed scale folded in. An architecture may name a
tensor differently from SAELens (Gated's b_enc is SAELens's b_gate: `saelens_export`'s "rename"). SAELens
conventions that saelab does not have are folded into the weights exactly, so the imported SAE computes the same
codes and reconstruction:

* `apply_b_dec_to_input=False` (pre = x̃·W_enc + b_enc): b_enc ← b_enc + b_dec·W_enc, since saelab always centres
  (Gated's magnitude path too: b_mag ← b_mag + exp(r_mag)·(b_dec·W_enc));
* `rescale_acts_by_decoder_norm=True` (TopK ranks pre·‖W_dec,i‖ and decodes (z/‖W_dec,i‖)·W_dec):
  W_enc, b_enc ← ×‖W_dec,i‖ and W_dec ← W_dec/‖W_dec,i‖ (SAELens's own `fold_W_dec_norm`);
* per-token normalisations use the SAE's modes: `layer_norm` with SAELens's statistics (unbiased σ, σ + 1e-5 on the
  way in), `constant_norm_rescale` (x·√d/‖x‖).

Anything else (another architecture, an unfolded `expected_average_only_in` scale, whitening, a fine-tuning scale)
is refused with a `SAEFileError` that says why; so is a broken folder: a file missing, truncated or not JSON, files
that disagree with each other, or non-finite weights. Every message names the file that is wrong.

The SAE is an argument here, never imported (`SparseAutoencoder.save` and `saelab.sae.sae.load_sae` call this
module): what is not the SAE's own — how its activations were produced — comes from the caller.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from saelab.config import SAEConfig, from_dict
from saelab.errors import SaelabError, SAEFileError
from saelab.sae.transcoder import fold_input_bias, from_saelens_architecture, saelens_architecture

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
SAELAB_FILE = "saelab.json"
SAELAB_FORMAT = 2  # saelab.json layout (1: before SAELens metadata and loss_normalizer)
# the SAELens release whose layout save_sae writes and whose loader tests/test_saelens.py checks it against; a
# `sae_lens_version` >= 6 also tells SAELens to keep our `metadata` as it is
SAELENS_FORMAT = "6.54.12"
BASE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
SAELENS_NORMALIZE = {"none": "none", "scale": "none", "layer_norm": "layer_norm",
                     "constant_norm_rescale": "constant_norm_rescale"}
IMPORTABLE = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu", "gated": "gated",
              "abstopk": "abstopk"}  # SAELens → saelab
TOPK_FAMILY = ("topk", "abstopk")  # SAELens configs with k and rescale_acts_by_decoder_norm
SAELENS_LN_EPS = 1e-5  # SAELens's (and OpenAI's) layer norm: (x − μ) / (σ_unbiased + 1e-5)
RESAVE = "restore the original file, or save the SAE again from SAELens"


# ------------------------------------------------------------------------------------------------------ save
def folded_state(sae) -> dict[str, torch.Tensor]:
    """Weights that act on raw activations: a fixed input scale s is folded in (x̃ = s·x), as SAELens does:
    W_enc ← s·W_enc, W_dec ← W_dec / s, b_dec ← b_dec / s (the code values are unchanged). A transcoder's output side
    has its own scale t (W_dec / t, b_dec / t, W_skip·s/t) and its b_in is folded into b_enc."""
    scaled = sae.cfg.normalize == "scale"
    s, t = (sae.cfg.input_scale, sae.output_scale) if scaled else (1.0, 1.0)
    state = {
        "W_enc": (sae.W_enc.detach() * s).contiguous(),
        "b_enc": sae.b_enc.detach().contiguous(),
        "W_dec": (sae.W_dec.detach() / t).contiguous(),
        "b_dec": (sae.b_dec.detach() / t).contiguous(),
    }
    if sae.cfg.target_hook:
        state = fold_input_bias(sae, state)
    if sae.cfg.skip:
        state["W_skip"] = (sae.W_skip.detach() * (s / t)).contiguous()
    return state


def saelens_export(sae) -> dict:
    """The architecture's SAELens view: {"architecture", "cfg" (extra cfg.json keys), "tensors" (extra weights),
    "rename" (our name → SAELens's, for a base tensor SAELens names differently)}."""
    export = sae.arch.saelens_export(sae)
    export = {"architecture": export["architecture"], "cfg": dict(export.get("cfg") or {}),
              "tensors": dict(export.get("tensors") or {}), "rename": dict(export.get("rename") or {})}
    if sae.cfg.target_hook:  # SAELens's transcoder class of that encoder; b_in folded into its biases
        export["architecture"] = saelens_architecture(export["architecture"], sae.cfg.skip)
        export["cfg"]["d_out"] = sae.W_dec.shape[1]
        export["tensors"] = fold_input_bias(sae, export["tensors"]) if "b_mag" in export["tensors"] else \
            export["tensors"]
    return export


def run_metadata(train_config: dict | None) -> dict:
    """SAELens metadata on how an SAE's activations were produced, from its run's train config (a dict): the context
    size and the dataset; null without one, since the SAE itself does not know them."""
    tc = train_config or {}
    return {"context_size": tc.get("context_size"), "dataset_path": (tc.get("corpus") or {}).get("source")}


def saelens_metadata(sae, train_config: dict | None = None) -> dict:
    """The metadata SAELens reads (`SAEMetadata`, `ActivationsStore.from_sae`): the model and hook from the SAE's
    config, the context size and dataset from the run's train config (`run_metadata`). `hook_layer` is null here:
    it follows the model's naming of its blocks, so the caller that knows the model sets it (`save_sae`'s
    `metadata`)."""
    run = run_metadata(train_config)
    return {
        "sae_lens_version": SAELENS_FORMAT,
        "sae_lens_training_version": None,  # not trained by SAELens
        "model_name": sae.cfg.model_name,
        "model_class_name": "HookedTransformer",
        "hook_name": sae.cfg.hook_name,
        **({"hook_name_out": sae.cfg.target_hook} if sae.cfg.target_hook else {}),  # SAELens's transcoders' target
        "hook_head_index": None,
        "hook_layer": None,
        "context_size": run["context_size"],
        "prepend_bos": True,  # every row starts with BOS (saelab.data.packing)
        "seqpos_slice": [1, None],  # and the SAE is trained without position 0 (the BOS)
        "dataset_path": run["dataset_path"],
        "model_from_pretrained_kwargs": {},
        "exclude_special_tokens": False,
        "sequence_separator_token": "eos",  # documents are joined by EOS
        "disable_concat_sequences": False,
        "neuronpedia_id": None,
        "training_architecture": sae.cfg.architecture,
        "saelab_version": _saelab_version(),
    }


def saelens_cfg(sae, export: dict, metadata: dict) -> dict:
    """cfg.json as SAELens 6 writes it (`SAEConfig.to_dict`)."""
    cfg = sae.cfg
    out = {"architecture": export["architecture"], "d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": cfg.dtype,
           "device": "cpu", "apply_b_dec_to_input": not cfg.target_hook,  # a transcoder's b_in is folded in
           "normalize_activations": SAELENS_NORMALIZE[cfg.normalize],
           "reshape_activations": "none",
           # SAELens 6 reads these from metadata; the top-level copies are for tools that read SAELens < 6's layout
           "model_name": cfg.model_name, "hook_name": cfg.hook_name}
    if sae.arch.saelens_export(sae)["architecture"] in TOPK_FAMILY:
        out["rescale_acts_by_decoder_norm"] = False
    out.update(export["cfg"])
    out["metadata"] = metadata
    return out


def save_sae(sae, path: str | Path, extra: dict | None = None, metadata: dict | None = None) -> Path:
    """Write `cfg.json` + `sae_weights.safetensors` (SAELens layout) + `saelab.json` into the folder `path`.

    `extra` goes into saelab.json (the trainer passes the training summary and `train_config`, from which the
    SAELens metadata — context size, dataset — is taken); `metadata` sets SAELens metadata fields that only the
    caller knows (`saelab.training.trainer.saelens_run_metadata`). Each file is written to a temporary name and
    renamed, so an interrupted save leaves no half-written file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    export = saelens_export(sae)
    tensors = {export["rename"].get(name, name): t for name, t in folded_state(sae).items()}
    tensors.update({name: t.detach().contiguous() for name, t in export["tensors"].items()})
    meta = saelens_metadata(sae, (extra or {}).get("train_config"))
    meta.update(metadata or {})
    if cfg.normalize == "layer_norm" and (not cfg.ln_unbiased or cfg.ln_eps != SAELENS_LN_EPS):
        meta["saelab_note"] = (f"layer_norm with {'unbiased' if cfg.ln_unbiased else 'biased'} sigma and eps "
                               f"{cfg.ln_eps}: SAELens uses the unbiased sigma and eps 1e-5, so its x_hat differs "
                               f"slightly from saelab's")
    saved_cfg = asdict(cfg)
    saved_cfg.update(normalize="none" if cfg.normalize == "scale" else cfg.normalize, input_scale=1.0, target_scale=1.0)
    scaled = cfg.normalize == "scale"
    t = sae.output_scale if scaled else 1.0  # the loss normaliser is in the decoder's (output) space
    info = {"format": SAELAB_FORMAT, "sae": saved_cfg, "folded_input_scale": cfg.input_scale if scaled else None,
            **({"folded_target_scale": cfg.target_scale if scaled else None} if cfg.target_hook else {}),
            "loss_normalizer": float(sae.loss_normalizer) / t ** 2, "saelens_format": SAELENS_FORMAT}
    info.update(extra or {})

    _replace(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    _replace(path / SAELAB_FILE, lambda tmp: tmp.write_text(json.dumps(info, indent=2, default=_json_default)))
    _replace(path / CFG_FILE, lambda tmp: tmp.write_text(
        json.dumps(saelens_cfg(sae, export, meta), indent=2, default=_json_default)))
    return path


# ------------------------------------------------------------------------------------------------------ load
@dataclass
class SAEFolder:
    """A saelab or SAELens SAE folder as read: the config to build the SAE from and the weights for it."""

    path: Path
    cfg: SAEConfig
    raw: dict  # cfg.json
    state: dict[str, torch.Tensor]  # the weights, by the file's names
    info: dict  # saelab.json; {} for a folder SAELens saved
    fold: dict  # the SAELens conventions to fold into the weights (`fold_conventions`'s arguments)


def read_sae_folder(path: str | Path) -> SAEFolder:
    """Read a saelab folder or a SAELens-saved one (see the module docstring), before any SAE is built; raise
    `SAEFileError` naming the file for anything missing or broken."""
    path = Path(path)
    if not path.is_dir():
        raise SAEFileError(f"{path}: {'no such folder' if not path.exists() else 'not a folder'}",
                           hint=f"an SAE is a folder with {CFG_FILE} and {WEIGHTS_FILE} (SAELens's layout)")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        found = sorted(p.name for p in path.iterdir())
        raise SAEFileError(f"{path}: no {WEIGHTS_FILE} (found {found})",
                           hint="saelab loads SAEs only from safetensors + JSON, never from pickles (.pt/.pkl); "
                                "point at the folder that holds cfg.json and sae_weights.safetensors")
    raw = _read_json(path / CFG_FILE)
    state = _read_weights(weights)
    if (path / SAELAB_FILE).exists():
        info = _read_json(path / SAELAB_FILE)
        return SAEFolder(path, _saelab_config(info, path / SAELAB_FILE), raw, state, info, {})
    cfg, state, fold = import_saelens(raw, state, path)
    return SAEFolder(path, cfg, raw, state, {}, fold)


def load_weights(sae, folder: SAEFolder):
    """Set `sae`, built from `folder.cfg`, to the folder's weights once they are checked against it (a file that
    disagrees with the other, or weights that do not fit, is a `SAEFileError` naming it); returns the SAE."""
    path, state, info, fold = folder.path, folder.state, folder.info, folder.fold
    if info:  # a saelab folder: its cfg.json must say what saving its saelab.json would
        if "threshold" in state and hasattr(sae, "threshold") and state["threshold"].shape == sae.threshold.shape:
            with torch.no_grad():  # the export (what cfg.json should say) depends on whether θ was learned
                sae.threshold.copy_(state["threshold"])
        _check_agreement(sae, folder.raw, path)
    _check_tensors(sae, state, path)
    ours = {theirs: name for name, theirs in saelens_export(sae)["rename"].items()}
    state = {ours.get(name, name): t for name, t in state.items()}
    if fold:
        state = fold_conventions(state, **fold)
    own = saelens_export(sae)["tensors"]  # the architecture's own tensors: set by its `load_tensors`
    with torch.no_grad():
        for name, t in state.items():
            if name not in own:
                getattr(sae, name).copy_(t)
        sae.arch.load_tensors(sae, {name: t for name, t in state.items() if name in own})
        if info.get("loss_normalizer"):
            sae.loss_normalizer.fill_(float(info["loss_normalizer"]))
    return sae


def import_saelens(raw: dict, state: dict[str, torch.Tensor], path: Path) -> tuple[SAEConfig, dict, dict]:
    """A SAELens cfg.json + weights → (saelab config, weights, the conventions to fold: `fold_conventions`'s
    arguments)."""
    where = path / CFG_FILE
    raw = _saelens6(raw)
    meta = raw.get("metadata") or {}
    arch = raw.get("architecture")
    transcoder = from_saelens_architecture(arch) if isinstance(arch, str) else None
    if transcoder is not None:  # SAELens's transcoder classes: a standard or JumpReLU encoder, another output hook
        arch, skip = transcoder
        if not isinstance(raw.get("d_out"), int) or raw["d_out"] < 1:
            raise SAEFileError(f"{where}: d_out must be a positive integer, got {raw.get('d_out')!r}", hint=RESAVE)
        if "threshold" in state and arch == "standard":
            raise SAEFileError(f"{path / WEIGHTS_FILE}: a 'transcoder' (ReLU) has no threshold tensor", hint=RESAVE)
        if raw.get("apply_b_dec_to_input"):  # b_dec is the output's bias: SAELens's TranscoderConfig refuses it too
            raise SAEFileError(f"{where}: a {raw['architecture']!r} with apply_b_dec_to_input=true: a transcoder's "
                               f"b_dec is its output's bias (d_out wide) and never centres its input",
                               hint="an SAE's cfg.json says its SAE architecture (e.g. 'standard') and no d_out; a "
                                    "transcoder's says apply_b_dec_to_input false")
        # SAELens itself splices a transcoder without hook_name_out at its input hook (HookedSAETransformer)
        target = {"target_hook": meta.get("hook_name_out") or meta.get("hook_name") or "", "d_out": raw["d_out"],
                  "skip": skip}
    elif arch not in IMPORTABLE:
        raise SAEFileError(f"{where}: architecture {arch!r} cannot be loaded by saelab",
                           hint=f"saelab loads SAELens {sorted(IMPORTABLE)} SAEs (BatchTopK and Matryoshka ones as "
                                f"they are saved for inference, i.e. as jumprelu) and the transcoders 'transcoder', "
                                f"'skip_transcoder', 'jumprelu_transcoder', 'jumprelu_skip_transcoder'")
    else:
        target = {}
    for key in ("d_in", "d_sae"):
        if not isinstance(raw.get(key), int) or raw[key] < 1:
            raise SAEFileError(f"{where}: {key} must be a positive integer, got {raw.get(key)!r}", hint=RESAVE)
    norm = raw.get("normalize_activations") or "none"
    if norm not in ("none", "layer_norm", "constant_norm_rescale"):
        why = {"expected_average_only_in": "its input scale factor was never folded into the weights (SAELens "
                                           "folds it at the end of training and then says 'none')",
               "covariance_whitening": "its whitening transform was never folded into the weights"}
        raise SAEFileError(f"{where}: normalize_activations={norm!r} is not supported: "
                           f"{why.get(norm, 'unknown normalisation')}",
                           hint="fold it in SAELens (sae.fold_activation_norm_scaling_factor(s) or "
                                "sae.fold_activation_whitening(...)), save again, and load that folder")
    if raw.get("finetuning_scaling_factor") and "scaling_factor" in state:
        raise SAEFileError(f"{where}: a fine-tuning scaling factor is not supported", hint=RESAVE)
    if "scaling_factor" in state:  # SAELens < 6 sometimes wrote an all-ones one; SAELens drops it
        if not torch.equal(state["scaling_factor"], torch.ones_like(state["scaling_factor"])):
            raise SAEFileError(f"{path / WEIGHTS_FILE}: scaling_factor is not all ones but cfg.json does not say "
                               f"finetuning_scaling_factor", hint=RESAVE)
        state = {n: t for n, t in state.items() if n != "scaling_factor"}
    if raw.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise SAEFileError(f"{where}: reshape_activations={raw['reshape_activations']!r} is not supported",
                           hint="saelab reads 'none' and 'hook_z' (flatten heads: x.reshape(-1, n_heads * d_head))")

    dtype = str(raw.get("dtype", "float32")).removeprefix("torch.")
    if arch in TOPK_FAMILY:
        k = raw.get("k")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= raw["d_sae"]:
            raise SAEFileError(f"{where}: a {arch} SAE needs an integer k in [1, d_sae={raw['d_sae']}], got {k!r}",
                               hint=RESAVE)
    else:  # k does not enter inference; keep the trained one (BatchTopK's) for reference
        trained = (meta.get("training_architecture_details") or {}).get("k")
        k = max(1, min(round(trained), raw["d_sae"])) if isinstance(trained, (int, float)) else min(32, raw["d_sae"])
    try:
        cfg = SAEConfig(architecture=IMPORTABLE[arch], d_in=raw["d_in"], n_latents=raw["d_sae"], k=k,
                        hook_name=meta.get("hook_name") or "", model_name=meta.get("model_name") or "",
                        normalize=norm, ln_eps=SAELENS_LN_EPS, ln_unbiased=True,
                        dtype=dtype if dtype in ("float32", "float16", "bfloat16") else "float32", **target)
    except SaelabError as e:
        raise SAEFileError(f"{where}: {e.message}", hint=RESAVE) from None
    if arch == "standard" and "threshold" in state:
        raise SAEFileError(f"{path / WEIGHTS_FILE}: a 'standard' (ReLU) SAE has no threshold tensor", hint=RESAVE)
    fold = {"apply_b_dec_to_input": bool(raw.get("apply_b_dec_to_input", True)),
            "rescale": arch in TOPK_FAMILY and bool(raw.get("rescale_acts_by_decoder_norm", False))}
    return cfg, state, {} if target else fold  # a transcoder encodes x·W_enc + b_enc as saelab's (b_in 0) does


def fold_conventions(state: dict, apply_b_dec_to_input: bool = True, rescale: bool = False) -> dict:
    """SAELens's encoder conventions → saelab's pre = (x̃ − b_dec)·W_enc + b_enc over unit-free decoder rows
    (in float64, then back to the file's dtype)."""
    dt = state["W_enc"].dtype
    W_enc, b_enc, W_dec, b_dec = (state[n].double() for n in BASE_TENSORS)
    if not apply_b_dec_to_input:  # x̃·W + b = (x̃ − b_dec)·W + (b + b_dec·W)
        b_enc = b_enc + b_dec @ W_enc
    if rescale:  # rank and decode as SAELens's TopKSAE does, with the decoder norms folded (fold_W_dec_norm)
        norms = W_dec.norm(dim=-1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    out = dict(state)
    if not apply_b_dec_to_input and "b_mag" in state:  # Gated's magnitude path: x̃·(W_enc·exp(r_mag)) + b_mag
        shift = b_dec @ state["W_enc"].double()
        out["b_mag"] = (state["b_mag"].double() + shift * state["r_mag"].double().exp()).to(dt)
    out.update({n: t.to(dt).contiguous() for n, t in zip(BASE_TENSORS, (W_enc, b_enc, W_dec, b_dec))})
    return out


def _saelens6(raw: dict) -> dict:
    """A cfg.json of SAELens < 6 (flat: hook_point, activation_fn_str, activation_fn_kwargs) in the 6.x layout,
    as SAELens's own `handle_pre_6_0_config` reads it."""
    version = raw.get("sae_lens_version") or (raw.get("metadata") or {}).get("sae_lens_version")
    if version and _major(version) >= 6:
        return raw
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    new = {renames.get(k, k): v for k, v in raw.items()}
    new.setdefault("architecture", "standard")
    if new.get("activation_fn") == "topk" and (new.get("activation_fn_kwargs") or {}).get("k") is not None:
        new["architecture"], new["k"] = "topk", new["activation_fn_kwargs"]["k"]
    if isinstance(new.get("normalize_activations"), bool):
        new["normalize_activations"] = "expected_average_only_in" if new["normalize_activations"] else "none"
    meta = dict(new.get("metadata") or {})
    for key in ("model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos", "dataset_path"):
        if key in new:
            meta.setdefault(key, new[key])
    new["metadata"] = meta
    return new


def _saelab_config(info: dict, where: Path) -> SAEConfig:
    fmt = info.get("format", 1)
    if not isinstance(fmt, int) or fmt > SAELAB_FORMAT:
        raise SAEFileError(f"{where}: format {fmt!r} is newer than this saelab reads ({SAELAB_FORMAT})",
                           hint="upgrade saelab (pip install -U saelab)")
    if not isinstance(info.get("sae"), dict):
        raise SAEFileError(f"{where}: no 'sae' config mapping", hint=f"delete {where.name} to load the folder as "
                                                                      f"a plain SAELens SAE from {CFG_FILE}")
    sae_cfg = dict(info["sae"])
    if fmt == 1:  # saved before the architecture seam: layer norm was biased (SAEConfig moves TopK's old flags)
        sae_cfg.setdefault("ln_unbiased", False)
        sae_cfg.setdefault("ln_eps", 1e-5)
    try:
        return from_dict(SAEConfig, sae_cfg, path="sae")
    except SaelabError as e:
        raise SAEFileError(f"{where}: {e.message}", hint=e.hint) from None


def _check_agreement(sae, raw: dict, path: Path) -> None:
    """A saelab folder's cfg.json must say what save_sae would write for its saelab.json (else one was edited or
    the folder mixes two SAEs)."""
    expect = saelens_cfg(sae, saelens_export(sae), {})
    del expect["metadata"], expect["device"]
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    expect.update({"metadata.hook_name": sae.cfg.hook_name, "metadata.model_name": sae.cfg.model_name})
    if sae.cfg.target_hook:
        expect["metadata.hook_name_out"] = sae.cfg.target_hook
    for key, want in expect.items():
        got = meta.get(key.split(".")[1]) if key.startswith("metadata.") else raw.get(key)
        if got != want:
            raise SAEFileError(f"{path}: {CFG_FILE} and {SAELAB_FILE} disagree: {key} is {got!r} in {CFG_FILE} but "
                               f"{want!r} from {SAELAB_FILE}",
                               hint=f"one of them was edited or comes from another SAE; restore the matching file, "
                                    f"or delete {SAELAB_FILE} to load the folder as a plain SAELens SAE")


def _check_tensors(sae, state: dict, path: Path) -> None:
    """The file holds exactly the SAE's tensors, with the config's shapes, all finite."""
    where = path / WEIGHTS_FILE
    export = saelens_export(sae)
    attr = {export["rename"].get(n, n): n for n in BASE_TENSORS + (("W_skip",) if sae.cfg.skip else ())}
    # (the file's name → the SAE's)
    names = list(attr) + [n for n in export["tensors"] if n not in BASE_TENSORS]
    extra, missing = sorted(set(state) - set(names)), [n for n in names if n not in state]
    kind = ("skip-transcoder" if sae.cfg.skip else "transcoder") if sae.cfg.target_hook else "SAE"
    if missing or extra:
        raise SAEFileError(f"{where}: {'missing ' + str(missing) if missing else ''}"
                           f"{'; ' if missing and extra else ''}{'unexpected ' + str(extra) if extra else ''} "
                           f"for a {sae.cfg.architecture} {kind}",
                           hint="a skip-transcoder's W_skip goes with cfg.json's architecture 'skip_transcoder' (or "
                                "'jumprelu_skip_transcoder')" if "W_skip" in missing + extra else
                                "the weights do not belong to this config; restore the matching file")
    for name in names:
        want = tuple((getattr(sae, attr[name]) if name in attr else export["tensors"][name]).shape)
        if tuple(state[name].shape) != want:
            width = state[name].shape[-1]
            if name in ("W_dec", "b_dec") and not sae.cfg.target_hook and width != sae.d_in:
                raise SAEFileError(f"{where}: {name} is {tuple(state[name].shape)}: its output is {width} wide, not "
                                   f"d_in {sae.d_in}, so these are a transcoder's weights, but the config is an SAE's",
                                   hint=f"a transcoder's cfg.json says architecture 'transcoder' (or "
                                        f"'skip_transcoder', 'jumprelu_transcoder', ...), d_out {width} and its "
                                        f"target hook as metadata.hook_name_out")
            d_out = f", d_out {sae.cfg.d_out}" if sae.cfg.target_hook else ""
            raise SAEFileError(f"{where}: {name} is {tuple(state[name].shape)} but the config says {want} "
                               f"(d_in {sae.d_in}, n_latents {sae.n_latents}{d_out})",
                               hint="the weights and the config come from different SAEs (or one was edited); "
                                    "restore the matching file or re-save the SAE")
        bad = int((~torch.isfinite(state[name])).sum())
        if bad:
            raise SAEFileError(f"{where}: {name} has {bad} non-finite value(s) (NaN/inf) of {state[name].numel()}",
                               hint="the SAE diverged during training or the file is corrupt; retrain (a lower "
                                    "--lr) or load an earlier checkpoint")


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise SAEFileError(f"{file}: missing", hint="an SAE folder needs cfg.json next to sae_weights.safetensors")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise SAEFileError(f"{file}: not valid JSON{where}",
                           hint="the file is truncated or was edited by hand; restore it or re-save the SAE") from None
    if not isinstance(data, dict):
        raise SAEFileError(f"{file}: must be a JSON object, got {type(data).__name__}",
                           hint="restore the file or re-save the SAE")
    return data


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error type for every malformed file
        raise SAEFileError(f"{file}: not a readable safetensors file ({e})",
                           hint="it is truncated or corrupt (an interrupted copy or download?); copy it again or "
                                "re-save the SAE") from None


# ------------------------------------------------------------------------------------------------------ helpers
def _replace(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def _saelab_version() -> str:
    from saelab import __version__

    return __version__


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)
