"""Every bad input gets one clear line: a table of bad inputs across every `saelab` command, and the error boundary.

Each row of `CASES` runs `saelab.cli.main(argv)` in-process and asserts what a user must see: exit code 2, no
traceback, exactly one `saelab <command>: error: ...` line on stderr (argparse's usage block may precede it, one
`hint: ...` line may follow it) that names the offending value, nothing on stdout's error path, and no file left
behind (the test's directory, which is also the working directory, is compared before and after).

ADDING ROWS (each new command's issue adds its own: dashboard, steer, patch, explore, ...):
    Case("command-what-is-wrong", ["command", "--flag", "{tmp}/bad"], ["text the error line must contain"]),
  - placeholders in argv: {tmp} the test's directory (also the cwd) with the files `make_inputs` puts there
    (notes.txt: a plain file, empty.txt, bad.txt: not YAML/JSON, stuff/: a non-empty folder, ...; add what you
    need there); {cache} a small sound activation cache of the reference model (shared, read-only: the test
    checks it is untouched); {truncated}: a copy of it with a truncated shard.
  - {sae_truncated}, {sae_bad_cfg}, {sae_nan}: copies of a small sound SAE folder, broken as named; {sae_sound}:
    an intact copy;
  - `hint=` text the hint line must contain; `model=True` when the error can only be found with the model
    loaded (a hook name, the model's context length): the shared reference model is handed in so the row stays
    fast. Prefer errors found before the model is loaded: most rows here never import TransformerLens.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from saelab.cli import main

HOOK = "blocks.2.hook_resid_pre"  # the reference model's middle residual stream (the default hook)
T = 32  # the shared cache's context size
PROBE_TOKENS = ["eval", "{sae_sound}", "--suite", "probing", "--level", "token", "--data"]  # + a span file


@dataclass
class Case:
    id: str
    argv: list[str]
    names: list[str]  # every one of these must appear in the error line (the offending value, mostly)
    hint: str = ""  # text the hint line must contain ("" : a hint is optional)
    model: bool = False  # needs the (shared) reference model to find the error
    offline: bool = False  # the hub must look unreachable (a hub name, with no network)


CASES = [
    # ------------------------------------------------------------------------------------------ info
    Case("info-missing-model-dir", ["info", "--model", "{tmp}/no-model"], ["no-model", "no such local directory"]),
    Case("info-model-is-a-file", ["info", "--model", "{tmp}/notes.txt"], ["notes.txt", "a file"]),
    Case("info-model-dir-without-config", ["info", "--model", "{tmp}/stuff"], ["stuff", "without config.json"]),
    Case("info-rows-zero", ["info", "--rows", "0"], ["--rows", "got 0"]),
    Case("info-context-size-one", ["info", "--context-size", "1"], ["--context-size", "got 1"]),
    Case("info-bad-model-dtype", ["info", "--model-dtype", "float64"], ["model.dtype", "'float64'"]),
    Case("info-bad-device", ["info", "--device", "tpu"], ["model.device", "'tpu'"]),
    Case("info-missing-dataset", ["info", "--dataset", "{tmp}/nope.txt"], ["nope.txt", "no such file"]),
    Case("info-empty-dataset", ["info", "--dataset", "{tmp}/empty.txt"], ["empty.txt", "has no text"]),
    Case("info-rows-not-a-number", ["info", "--rows", "lots"], ["--rows", "'lots'"]),
    # ------------------------------------------------------------------------------------------ hooks
    Case("hooks-missing-model-dir", ["hooks", "--model", "./no/such/model/dir"], ["./no/such/model/dir"],
         hint="--model reference"),
    Case("hooks-hub-name-offline", ["hooks", "--model", "saelab-tests/no-such-model"],
         ["saelab-tests/no-such-model", "cannot be reached"], offline=True),
    Case("hooks-bad-model-dtype", ["hooks", "--model-dtype", "int8"], ["'int8'"]),
    Case("hooks-model-without-weights", ["hooks", "--model", "{tmp}/noweights"], ["noweights", "has no weights"],
         hint="save_pretrained"),
    Case("hooks-model-without-tokenizer", ["hooks", "--model", "{tmp}/notokenizer"],
         ["notokenizer", "has no tokenizer"], hint="tokenizer.save_pretrained"),
    Case("hooks-model-unknown-architecture", ["hooks", "--model", "{tmp}/nonsense"],
         ["nonsense", "model_type 'nonsense' is not one transformers knows", "FooForCausalLM"], hint="model_type"),
    Case("hooks-model-without-adapter", ["hooks", "--model", "{tmp}/resnet"],
         ["resnet", "TransformerLens has no adapter", "model_type 'resnet'"], hint="list_supported_models"),
    # ------------------------------------------------------------------------------------------ cache
    Case("cache-empty-dataset", ["cache", "--dataset", "{tmp}/empty.txt", "--out", "{tmp}/c"],
         ["empty.txt", "has no text"]),
    Case("cache-missing-dataset", ["cache", "--dataset", "{tmp}/nope.txt", "--out", "{tmp}/c"], ["nope.txt"]),
    Case("cache-tokens-zero", ["cache", "--tokens", "0", "--out", "{tmp}/c"], ["tokens", "got 0"]),
    Case("cache-tokens-not-a-count", ["cache", "--tokens", "lots"], ["not a count", "'lots'"]),
    Case("cache-bad-dtype", ["cache", "--dtype", "int8"], ["dtype", "'int8'"]),
    Case("cache-context-size-one", ["cache", "--context-size", "1"], ["context_size", "got 1"]),
    Case("cache-batch-rows-zero", ["cache", "--batch-rows", "0"], ["batch_rows", "got 0"]),
    Case("cache-shard-rows-not-a-multiple", ["cache", "--shard-rows", "33"], ["shard_rows", "33"]),
    Case("cache-bad-split", ["cache", "--split", "test"], ["split", "'test'"]),
    Case("cache-hook-twice", ["cache", "--hooks", f"{HOOK},{HOOK}"], ["hooks", "twice"]),
    Case("cache-config-not-yaml-or-json", ["cache", "--config", "{tmp}/bad.txt"],
         ["bad.txt", "not valid YAML/JSON", "line 1, column 1"]),
    Case("cache-config-missing", ["cache", "--config", "{tmp}/nope.yaml"], ["nope.yaml", "no such config file"]),
    Case("cache-config-not-a-mapping", ["cache", "--config", "{tmp}/list.json"], ["list.json", "mapping"]),
    Case("cache-config-broken-yaml", ["cache", "--config", "{tmp}/broken.yaml"], ["broken.yaml", "line 2, column 9"]),
    Case("cache-out-is-a-file", ["cache", "--out", "{tmp}/notes.txt"], ["notes.txt", "a file"]),
    Case("cache-out-not-empty", ["cache", "--out", "{tmp}/stuff"], ["stuff", "not an activation cache"]),
    Case("cache-out-cannot-be-made", ["cache", "--out", "/proc/saelab-x"], ["/proc/saelab-x", "cannot be written"]),
    Case("cache-hooks-empty", ["cache", "--hooks", "", "--out", "{tmp}/c"], ["hooks", "empty"]),
    Case("cache-device-missing", ["cache", "--device", "cuda:3", "--out", "{tmp}/c"], ["cuda:3", "does not exist"]),
    Case("cache-device-not-a-name", ["cache", "--device", "cudax", "--out", "{tmp}/c"], ["cudax", "not a device"]),
    Case("train-device-missing", ["train", "--device", "cuda:3", "--out", "{tmp}/r"], ["cuda:3", "does not exist"]),
    Case("cache-missing-model", ["cache", "--model", "{tmp}/no-model", "--out", "{tmp}/c"], ["no-model"]),
    Case("cache-wrong-hook", ["cache", "--hooks", "blocks.1.hook_resid_pots", "--out", "{tmp}/c"],
         ["'blocks.1.hook_resid_pots'", "did you mean blocks.1.hook_resid_post"], hint="saelab hooks", model=True),
    Case("cache-hook-that-never-fires", ["cache", "--hooks", "blocks.0.hook_mlp_in", "--out", "{tmp}/c"],
         ["'blocks.0.hook_mlp_in'", "carries no activation", "did you mean"], model=True),
    Case("cache-model-without-weights", ["cache", "--model", "{tmp}/noweights", "--out", "{tmp}/c"], ["no weights"]),
    Case("cache-hook-the-family-lacks", ["cache", "--model", "{neox}", "--hooks", "blocks.0.hook_resid_mid",
                                         "--out", "{tmp}/c"],
         ["'blocks.0.hook_resid_mid'", "in parallel", "did you mean blocks.0.hook_resid_p"], hint="saelab hooks"),
    Case("cache-context-longer-than-model", ["cache", "--context-size", "4096", "--hooks", HOOK, "--out", "{tmp}/c"],
         ["4096", "longer than the model's context"], model=True),
    Case("cache-info-missing", ["cache", "info", "{tmp}/nope"], ["nope", "no activation cache here"]),
    # ------------------------------------------------------------------------------------------ cache verify
    Case("verify-no-dir", ["cache", "verify"], ["verify", "no cache directory"], hint="saelab cache verify DIR"),
    Case("verify-missing", ["cache", "verify", "{tmp}/nope"], ["nope", "no activation cache here (no manifest.json)"],
         hint="saelab cache"),
    Case("verify-a-file", ["cache", "verify", "{tmp}/notes.txt"], ["notes.txt", "a file, not an activation cache"]),
    Case("verify-not-a-cache", ["cache", "verify", "{tmp}/stuff"], ["stuff", "has no manifest.json"]),
    Case("verify-manifest-not-json", ["cache", "verify", "{tmp}/badmanifest"], ["manifest.json", "not valid JSON"]),
    # ------------------------------------------------------------------------------------------ train
    Case("train-cache-is-a-file", ["train", "--cache", "{tmp}/notes.txt"], ["notes.txt", "a file"]),
    Case("train-cache-missing", ["train", "--cache", "{tmp}/nope"], ["nope", "no activation cache here"],
         hint="saelab cache"),
    Case("train-cache-lacks-hook", ["train", "--cache", "{cache}", "--hook", "blocks.3.hook_resid_post"],
         ["'blocks.3.hook_resid_post'", HOOK]),
    Case("train-cache-truncated-shard", ["train", "--cache", "{truncated}"], ["acts-00001.npy", "truncated"],
         hint="verify"),
    Case("train-cache-k-above-width", ["train", "--cache", "{cache}", "--n-latents", "8", "--k", "32"],
         ["sae.k", "32", "n_latents (8)"]),
    Case("train-encoder-chunk-negative", ["train", "--encoder-chunk", "-5"], ["--encoder-chunk", "'-5'", "auto"]),
    Case("train-cache-encoder-chunk-above-width", ["train", "--cache", "{cache}", "--n-latents", "64",
                                                   "--encoder-chunk", "65"],
         ["sae.encoder_chunk", "65", "n_latents (64)"]),
    Case("train-encoder-chunk-relu", ["train", "--arch", "relu", "--encoder-chunk", "1024"],
         ["sae.encoder_chunk", "relu trains with the dense encoder"]),
    Case("train-cache-beyond-memory", ["train", "--cache", "{cache}", "--n-latents", str(2 ** 28)],
         ["268,435,456 latents", "needs at least", "GiB free"], hint="--shard-latents"),
    Case("train-shard-latents-negative", ["train", "--shard-latents", "-1"], ["shard_latents", "got -1"]),
    Case("train-shard-latents-without-torchrun", ["train", "--shard-latents", "2"],
         ["shard_latents 2", "this is one process"], hint="torchrun --nproc-per-node 2"),
    Case("train-shard-latents-uneven", ["train", "--shard-latents", "3", "--n-latents", "64", "--k", "4"],
         ["shard_latents 3", "64 latents do not split into 3 equal shards"]),
    Case("train-shard-latents-narrower-than-k", ["train", "--shard-latents", "4", "--n-latents", "64"],
         ["shard_latents 4", "16 latents, fewer than k (32)"]),
    Case("train-shard-latents-transcoder", ["train", "--shard-latents", "2", "--hook", "blocks.2.hook_mlp_in",
                                            "--target-hook", "blocks.2.hook_mlp_out"],
         ["shard_latents", "a transcoder (--target-hook blocks.2.hook_mlp_out)"]),
    Case("train-shard-latents-relu", ["train", "--arch", "relu", "--shard-latents", "2"],
         ["shard_latents", "covers batchtopk, topk", "relu"]),
    Case("train-cache-other-model", ["train", "--cache", "{cache}", "--model", "gpt2"], ["'gpt2'", "'reference'"]),
    Case("train-cache-other-context", ["train", "--cache", "{cache}", "--context-size", "64"],
         ["context_size", "64", str(T)]),
    Case("train-cache-and-stream", ["train", "--cache", "{cache}", "--source", "stream"], ["stream", "cache"]),
    Case("train-config-not-yaml-or-json", ["train", "--config", "{tmp}/bad.txt"],
         ["bad.txt", "not valid YAML/JSON (line 1, column 1"]),
    Case("train-config-unknown-field", ["train", "--config", "{tmp}/tokenz.yaml"], ["tokenz", "unknown field"],
         hint="tokenz.yaml"),
    Case("train-config-section-not-a-mapping", ["train", "--config", "{tmp}/sae5.yaml"], ["sae", "mapping", "5"]),
    Case("train-tokens-zero", ["train", "--tokens", "0"], ["tokens", "got 0"]),
    Case("train-batch-size-zero", ["train", "--batch-size", "0"], ["batch_size", "got 0"]),
    Case("train-negative-lr", ["train", "--lr", "-1"], ["lr", "-1"]),
    Case("train-source-cache-without-cache", ["train", "--source", "cache"], ["cache", "--cache"]),
    Case("train-bad-source", ["train", "--source", "disk"], ["source", "'disk'"]),
    Case("train-bad-architecture", ["train", "--arch", "bogus"], ["sae.architecture", "'bogus'"]),
    Case("train-gtopk-cache-without-grads", ["train", "--cache", "{cache}", "--arch", "gtopk", "--tokens", "1k"],
         ["without gradients"], hint="--with-grads"),
    Case("train-option-of-another-arch", ["train", "--arch", "topk", "--beta", "2"], ["beta", "unknown field"]),
    Case("train-bad-arch-option", ["train", "--arch", "gtopk", "--grad-norm", "l3"], ["grad_norm", "'l3'"]),
    Case("train-bad-zipf-exponent", ["train", "--arch", "feature_choice", "--zipf-exponent", "-1"],
         ["zipf_exponent", "got -1.0"]),
    Case("train-bad-group-fractions", ["train", "--arch", "matryoshka", "--group-fractions", "0.5,0.7"],
         ["group_fractions", "sum to at most 1"]),
    Case("train-negative-l1-coef", ["train", "--arch", "relu", "--l1-coef", "-1"], ["l1_coef", "got -1.0"]),
    Case("train-l1-warmup-above-one", ["train", "--arch", "gated", "--l1-warmup-fraction", "1.5"],
         ["l1_warmup_fraction", "got 1.5"]),
    Case("train-target-l0-above-width", ["train", "--cache", "{cache}", "--arch", "jumprelu", "--n-latents", "64",
                                         "--target-l0", "100"], ["target_l0", "got 100", "n_latents (64)"],
         hint="--target-l0"),
    Case("train-cache-lacks-target-hook", ["train", "--cache", "{cache}", "--target-hook", "blocks.2.hook_mlp_out"],
         ["--target-hook", "'blocks.2.hook_mlp_out'", HOOK], hint=f"saelab cache --hooks {HOOK},blocks.2.hook_mlp_out"),
    Case("train-skip-without-target-hook", ["train", "--skip"], ["sae.skip", "needs a target hook"],
         hint="--target-hook"),
    Case("train-mp-transcoder", ["train", "--arch", "mp", "--target-hook", "blocks.2.hook_mlp_out"],
         ["sae.target_hook", "mp SAE cannot be a transcoder", "own decoder rows"]),
    Case("train-transcoder-layer-norm", ["train", "--target-hook", "blocks.2.hook_mlp_out", "--normalize",
                                        "layer_norm"], ["sae.normalize", "'layer_norm'", "target's own statistics"]),
    Case("train-resume-target-width-differs", ["train", "--cache", "{cache}", "--target-hook", HOOK, "--out",
                                               "{tmp}/tc_run", "--resume"],
         ["--resume", "d_out 99", "d_out 256"], hint="the cache the run was trained on"),
    Case("train-k-zero", ["train", "--k", "0"], ["sae.k", "got 0"]),
    Case("train-threads-negative", ["train", "--threads", "-1"], ["threads", "got -1"]),
    Case("train-cache-tokens-zero", ["train", "--cache-tokens", "0"], ["cache_tokens", "got 0"]),
    Case("train-missing-model", ["train", "--model", "{tmp}/no-model"], ["no-model"]),
    Case("train-model-without-tokenizer", ["train", "--model", "{tmp}/notokenizer"], ["notokenizer", "no tokenizer"]),
    Case("train-model-unknown-architecture", ["train", "--model", "{tmp}/nonsense"], ["nonsense", "model_type"]),
    Case("train-empty-dataset", ["train", "--dataset", "{tmp}/empty.txt"], ["empty.txt", "has no text"]),
    Case("train-out-is-a-file", ["train", "--out", "{tmp}/notes.txt"], ["notes.txt", "a file"]),
    Case("train-out-not-a-run", ["train", "--out", "{tmp}/stuff"], ["stuff", "not a run directory"]),
    Case("train-wrong-hook", ["train", "--hook", "blocks.1.hook_resid_pots", "--cache-tokens", "1k", "--tokens", "1k"],
         ["'blocks.1.hook_resid_pots'", "did you mean"], model=True),
    Case("train-sweep-missing-file", ["train", "--sweep", "{tmp}/nope.yaml"], ["nope.yaml", "no such config file"]),
    Case("train-sweep-without-saes", ["train", "--sweep", "{tmp}/sweep_nosaes.yaml"], ["sweep_nosaes.yaml", "`saes`"]),
    Case("train-sweep-empty-list", ["train", "--sweep", "{tmp}/sweep_empty.yaml"], ["saes", "non-empty list"]),
    Case("train-sweep-unknown-key", ["train", "--sweep", "{tmp}/sweep_unknown.yaml"], ["tokenz", "unknown field"],
         hint="saes"),
    Case("train-sweep-unknown-sae-key", ["train", "--sweep", "{tmp}/sweep_unknown_sae.yaml"],
         ["saes[1].sae.kk", "unknown field"]),
    Case("train-sweep-duplicate-names", ["train", "--sweep", "{tmp}/sweep_dup.yaml"], ["'a'", "saes[0] and saes[1]"]),
    Case("train-sweep-bad-name", ["train", "--sweep", "{tmp}/sweep_slash.yaml"], ["'a/b'", "folder name"]),
    Case("train-sweep-out-per-sae", ["train", "--sweep", "{tmp}/sweep_out.yaml"], ["saes[0].out"]),
    Case("train-sweep-tokens-differ", ["train", "--sweep", "{tmp}/sweep_tokens.yaml"],
         ["saes[1] (b)", "tokens", "5000"], hint="top of the sweep file"),
    Case("train-sweep-batch-size-differ", ["train", "--sweep", "{tmp}/sweep_batch.yaml"], ["batch_size", "128"]),
    Case("train-sweep-hooks-differ", ["train", "--sweep", "{tmp}/sweep_hooks.yaml"],
         ["hook_name", "blocks.1.hook_resid_pre", "one hook"]),
    Case("train-sweep-and-config", ["train", "--sweep", "{tmp}/sweep_dup.yaml", "--config", "{tmp}/tokenz.yaml"],
         ["--config", "--sweep"]),
    # ------------------------------------------------------------------------------------------ later commands
    Case("steer-missing-run", ["steer", "{tmp}/nope", "--latent", "1"], ["nope", "no such file or directory"]),
    Case("steer-bad-strength-scale", ["steer", "{sae_sound}", "--latent", "1", "--strength-scale", "logits"],
         ["--strength-scale", "'logits'"]),
    Case("patch-unknown-task", ["patch", "--task", "brackets"], ["'brackets'", "built-in tasks"]),
    Case("patch-missing-pairs-file", ["patch", "--task", "{tmp}/nope.jsonl"], ["nope.jsonl", "does not exist"]),
    Case("patch-pairs-not-json", ["patch", "--task", "{tmp}/garbled.jsonl"], ["garbled.jsonl:2", "not JSON"]),
    Case("patch-pairs-missing-field", ["patch", "--task", "{tmp}/halfpairs.jsonl"],
         ["halfpairs.jsonl:1", "'corrupted'"], hint='"clean"'),
    Case("patch-pairs-unequal-length", ["patch", "--task", "{tmp}/uneven.jsonl"], ["uneven", "clean prompt is 5 tokens, corrupted is 8"],
         model=True),
    Case("patch-bad-method", ["patch", "--method", "activation,lrp"], ["--method", "'lrp'"]),
    Case("patch-bad-component", ["patch", "--components", "resid,neurons"], ["--components", "'neurons'"]),
    Case("patch-pairs-zero", ["patch", "--pairs", "0"], ["--pairs", "got 0"]),
    Case("patch-bad-relp-rule", ["patch", "--relp-rules", "ln,gelu"], ["relp rules", "'gelu'"]),
    Case("patch-bad-circuit-method", ["patch", "--circuit-method", "exact"], ["--circuit-method", "'exact'"]),
    Case("patch-sae-not-a-run", ["patch", "--sae", "{tmp}/stuff"], ["stuff", "neither a run directory"]),
    Case("explore-missing-bundle", ["explore", "{tmp}/nope"], ["nope", "does not exist"], hint="saelab dashboard"),
    Case("bench-synthetic-bad-arch", ["bench", "synthetic", "--archs", "bogus"], ["--archs", "'bogus'"]),
    Case("bench-synthetic-bad-parents", ["bench", "synthetic", "--parents", "some"], ["--parents", "'some'"]),
    Case("bench-synthetic-negative-mp-steps", ["bench", "synthetic", "--mp-steps", "-1"], ["--mp-steps", "-1"]),
    Case("dashboard-missing-run", ["dashboard", "{tmp}/nope"], ["nope", "neither a run directory"]),
    # ------------------------------------------------------------------------------------------ eval
    Case("calibrate-topk-has-no-threshold", ["calibrate", "{sae_sound}", "--dataset", "{tmp}/stuff"],
         ["no inference threshold"]),
    Case("calibrate-missing-dataset", ["calibrate", "{sae_sound}", "--dataset", "{tmp}/nope"], ["nope"]),
    Case("calibrate-missing-run", ["calibrate", "{tmp}/nope", "--dataset", "{tmp}/stuff"], ["nope"]),
    Case("calibrate-tokens-zero", ["calibrate", "{sae_sound}", "--dataset", "{tmp}/stuff", "--tokens", "0"],
         ["--tokens", "got 0"]),
    Case("eval-missing", ["eval", "{tmp}/nope"], ["nope", "no such file or directory"]),
    Case("eval-a-file", ["eval", "{tmp}/notes.txt"], ["notes.txt", "a file"]),
    Case("eval-not-a-run", ["eval", "{tmp}/stuff"], ["stuff", "neither a run directory"]),
    Case("eval-tokens-zero", ["eval", "{tmp}/stuff", "--tokens", "0"], ["--tokens", "got 0"]),
    Case("eval-broken-run-config", ["eval", "{tmp}/run"], ["config.yaml", "not valid YAML"]),
    Case("eval-sae-weights-truncated", ["eval", "{sae_truncated}"], ["sae_weights.safetensors", "not a readable"],
         hint="truncated"),
    Case("eval-sae-cfg-not-json", ["eval", "{sae_bad_cfg}"], ["cfg.json", "not valid JSON (line 1"]),
    Case("eval-sae-nan-weights", ["eval", "{sae_nan}"], ["sae_weights.safetensors", "W_dec", "non-finite"]),
    Case("eval-probing-token-level-without-spans", [*PROBE_TOKENS, "{tmp}/seqlabels.jsonl"],
         ["seqlabels.jsonl:1", "no spans field 'spans'"], hint="--level sequence"),
    Case("eval-probing-span-out-of-range", [*PROBE_TOKENS, "{tmp}/outofrange.jsonl"],
         ["outofrange.jsonl:2", "[4, 9]", "out of range", "5 characters"]),
    Case("eval-probing-span-end-before-start", [*PROBE_TOKENS, "{tmp}/backwards.jsonl"],
         ["backwards.jsonl:1", "[3, 3]", "end <= start"]),
    Case("eval-probing-span-not-integer", [*PROBE_TOKENS, "{tmp}/floatspan.jsonl"],
         ["floatspan.jsonl:1", "'number'", "integer pairs"]),
    Case("eval-probing-span-line-not-json", [*PROBE_TOKENS, "{tmp}/garbledspans.jsonl"],
         ["garbledspans.jsonl:2", "not JSON"]),
    Case("eval-probing-max-density-zero", ["eval", "{sae_sound}", "--suite", "probing", "--max-density", "0"],
         ["--max-density", "(0, 1]", "got 0.0"]),
    Case("eval-probing-ks-zero", ["eval", "{sae_sound}", "--suite", "probing", "--ks", "1,0"], ["--ks", "[1, 0]"]),
    Case("eval-probing-ks-not-integers", ["eval", "{sae_sound}", "--suite", "probing", "--ks", "1,two"],
         ["--ks", "'1,two'"]),
    Case("eval-probing-bad-selection", ["eval", "{sae_sound}", "--suite", "probing", "--selection", "mean"],
         ["--selection", "'mean'"]),
    Case("dashboard-bad-split", ["dashboard", "{sae_sound}", "--split", "test"], ["--split", "'test'", "heldout"]),
    Case("eval-probing-of-a-transcoder", ["eval", "{tmp}/transcoder", "--suite", "probing", "--tokens", "1k"],
         ["transcoder", "blocks.2.hook_mlp_out", "sparse probing needs an SAE"], hint="--suite core", model=True),
    Case("steer-a-transcoder", ["steer", "{tmp}/transcoder", "--latent", "1"],
         ["transcoder", "steering needs an SAE"], hint="--suite core", model=True),
    Case("eval-steering-scores-of-a-transcoder", ["eval", "{tmp}/transcoder", "--suite", "steering", "--tokens", "1k"],
         ["transcoder", "steering scores needs an SAE"], hint="--suite core", model=True),
    Case("eval-transcoder-labelled-sae", ["eval", "{tmp}/tc_as_sae"],
         ["tc_as_sae", "W_dec is (48, 24)", "a transcoder's weights, but the config is an SAE's"], hint="d_out 24"),
    Case("eval-sae-labelled-transcoder", ["eval", "{tmp}/sae_as_tc"],
         ["sae_as_tc", "'transcoder' with apply_b_dec_to_input=true"], hint="apply_b_dec_to_input false"),
    # ------------------------------------------------------------------------------------------ reference train
    Case("reference-heads-do-not-divide", ["reference", "train", "--out", "{tmp}/r", "--n-embd", "100"],
         ["n_embd", "100", "n_head (8)"]),
    Case("reference-repeat-frac", ["reference", "train", "--out", "{tmp}/r", "--repeat-frac", "2"],
         ["repeat_frac", "2"]),
    Case("reference-steps-zero", ["reference", "train", "--out", "{tmp}/r", "--steps", "0"], ["steps", "got 0"]),
    Case("reference-vocab-too-small", ["reference", "train", "--out", "{tmp}/r", "--vocab-size", "100"],
         ["vocab_size", "100"]),
    Case("reference-out-is-a-file", ["reference", "train", "--out", "{tmp}/notes.txt"], ["notes.txt", "a file"]),
    Case("reference-init-from-missing", ["reference", "train", "--out", "{tmp}/r", "--init-from", "{tmp}/nope"],
         ["init_from", "nope"]),
    Case("reference-empty-dataset", ["reference", "train", "--out", "{tmp}/r", "--dataset", "{tmp}/empty.txt"],
         ["empty.txt", "has no text"]),
    Case("reference-bad-decay", ["reference", "train", "--out", "{tmp}/r", "--decay", "step"], ["--decay", "'step'"]),
    Case("reference-no-out", ["reference", "train"], ["--out"]),
    # ------------------------------------------------------------------------------------------ doctor
    Case("doctor-json-is-a-folder", ["doctor", "--json", "{tmp}/stuff"], ["--json", "stuff", "is a directory"]),
    Case("doctor-json-folder-missing", ["doctor", "--json", "{tmp}/nope/doctor.json"],
         ["--json", "nope", "does not exist"], hint="create it first"),
    # ------------------------------------------------------------------------------------------ the command line
    Case("unknown-command", ["bogus"], ["'bogus'"]),
]


def make_inputs(tmp: Path) -> None:
    """The small bad inputs the rows refer to, written before the 'before' snapshot."""
    (tmp / "notes.txt").write_text("a plain file\n")
    (tmp / "empty.txt").write_text("")
    (tmp / "bad.txt").write_text("this is neither YAML nor JSON: [\n")
    (tmp / "list.json").write_text("[1, 2]\n")
    (tmp / "broken.yaml").write_text("tokens: 1000\nsplit: a: b\n")
    (tmp / "tokenz.yaml").write_text("tokenz: 5\n")
    (tmp / "sae5.yaml").write_text("sae: 5\n")
    stream = "source: stream\n"  # sweeps refused in `resolve` or after it: no cache, no model load
    (tmp / "sweep_nosaes.yaml").write_text("tokens: 1000\n")
    (tmp / "sweep_empty.yaml").write_text("saes: []\n")
    (tmp / "sweep_unknown.yaml").write_text("tokenz: 5\nsaes: [{name: a}]\n")
    (tmp / "sweep_unknown_sae.yaml").write_text("saes: [{name: a}, {name: b, sae: {kk: 4}}]\n")
    (tmp / "sweep_dup.yaml").write_text("saes: [{name: a}, {name: a, sae: {k: 8}}]\n")
    (tmp / "sweep_slash.yaml").write_text("saes: [{name: a/b}]\n")
    (tmp / "sweep_out.yaml").write_text("saes: [{name: a, out: elsewhere}]\n")
    (tmp / "sweep_tokens.yaml").write_text(stream + "saes: [{name: a}, {name: b, tokens: 5000}]\n")
    (tmp / "sweep_batch.yaml").write_text(stream + "saes: [{name: a}, {name: b, batch_size: 128}]\n")
    (tmp / "sweep_hooks.yaml").write_text(stream + "saes: [{name: a, hook_name: blocks.2.hook_resid_pre}, "
                                                   "{name: b, hook_name: blocks.1.hook_resid_pre}]\n")
    for model, files in {"noweights": ("config.json", "tokenizer.json"),
                         "notokenizer": ("config.json", "model.safetensors"),
                         "nonsense": ("config.json", "model.safetensors", "tokenizer.json"),
                         "resnet": ("config.json", "model.safetensors", "tokenizer.json")}.items():
        (tmp / model).mkdir()  # model folders missing a part (what is there is never read: the check comes first)
        for f in files:
            (tmp / model / f).write_text('{"model_type": "gpt2"}' if f == "config.json" else "{}")
    (tmp / "nonsense" / "config.json").write_text('{"model_type": "nonsense", "architectures": ["FooForCausalLM"]}')
    (tmp / "resnet" / "config.json").write_text('{"model_type": "resnet"}')  # transformers knows it, TransformerLens not
    (tmp / "stuff").mkdir()
    (tmp / "stuff" / "readme.md").write_text("not a cache, not a run, not a model\n")
    (tmp / "badmanifest").mkdir()
    (tmp / "badmanifest" / "manifest.json").write_text("{ truncated")
    (tmp / "run" / "sae").mkdir(parents=True)
    (tmp / "run" / "sae" / "cfg.json").write_text("{}")
    (tmp / "run" / "config.yaml").write_text("tokens: [1, 2\n")
    from saelab.config import SAEConfig
    from saelab.sae import SparseAutoencoder

    SparseAutoencoder(SAEConfig(d_in=256, n_latents=64, k=4, hook_name="blocks.2.mlp.hook_in", d_out=256,
                                target_hook="blocks.2.hook_mlp_out")).save(tmp / "transcoder")  # a sound transcoder
    saelens = Path(__file__).parent / "fixtures" / "saelens"  # SAELens's folders, their cfg.json mislabelled:
    for name, fixture, edits in (("tc_as_sae", "transcoder", {"architecture": "standard"}),  # a transcoder as an SAE
                                 ("sae_as_tc", "standard", {"architecture": "transcoder", "d_out": 16})):  # reverse
        shutil.copytree(saelens / fixture, tmp / name)
        (tmp / name / "cfg.json").write_text(json.dumps({**json.loads((tmp / name / "cfg.json").read_text()),
                                                         **edits}))
    step = tmp / "tc_run" / "checkpoints" / "step-00000010"  # a transcoder's checkpoint whose target is 99 wide
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"sae": {"hook_name": HOOK, "d_in": 256, "target_hook": HOOK,
                                                         "d_out": 99}}))
    (step / "state.safetensors").write_text("")
    good_spans = '{"text": "x = 1", "spans": {"number": [[4, 5]]}}\n'
    (tmp / "seqlabels.jsonl").write_text('{"text": "x = 1", "label": "assignment"}\n')
    (tmp / "outofrange.jsonl").write_text(good_spans + '{"text": "x = 1", "spans": {"number": [[4, 9]]}}\n')
    (tmp / "backwards.jsonl").write_text('{"text": "x = 1", "spans": {"number": [[3, 3]]}}\n' + good_spans)
    (tmp / "floatspan.jsonl").write_text('{"text": "x = 1", "spans": {"number": [[4.0, 5]]}}\n' + good_spans)
    (tmp / "garbledspans.jsonl").write_text(good_spans + '{"text": "x = 1", spans: oops}\n')
    pair = '{"clean": "x = (1", "corrupted": "x = [1", "answer": ")", "wrong": "]"}'
    (tmp / "garbled.jsonl").write_text(pair + "\n{clean: oops}\n")
    (tmp / "halfpairs.jsonl").write_text('{"clean": "x = (1", "answer": ")", "wrong": "]"}\n')
    (tmp / "uneven.jsonl").write_text('{"clean": "x = (1", "corrupted": "value_total = [[[1", "answer": ")", '
                                      '"wrong": "]"}\n')


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root → its content hash ('dir' for folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


ERROR_LINE = re.compile(r"^saelab( [a-z]+)*: error: ")


def assert_one_error(code, err, names=(), hint=""):
    """Exit 2, no traceback, exactly one error line (after argparse's usage block, if any; before at most one
    hint line) containing every one of `names`; returns the error line."""
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").splitlines()
    where = [i for i, line in enumerate(lines) if ERROR_LINE.match(line)]
    assert len(where) == 1, f"expected exactly one error line:\n{err}"
    i = where[0]
    assert i == 0 or lines[0].startswith("usage: "), f"unexpected lines before the error:\n{err}"
    after = lines[i + 1:]
    assert len(after) <= 1 and all(line.startswith("hint: ") for line in after), f"more than one hint line:\n{err}"
    for name in names:
        assert name in lines[i], f"{name!r} not named in: {lines[i]}"
    if hint:
        assert after and hint in after[0], f"hint should mention {hint!r}:\n{err}"
    return lines[i]


# ------------------------------------------------------------------------------------------------ shared inputs
@pytest.fixture(scope="module")
def shared(tmp_path_factory, reference_model):
    """A sound 2-shard cache of the reference model's middle residual stream (16 rows of 32 tokens)."""
    from saelab.activations import write_cache
    from saelab.config import CacheConfig

    root = tmp_path_factory.mktemp("shared")
    cache = write_cache(CacheConfig(hooks=[HOOK], out=str(root / "cache"), tokens=16 * T, context_size=T,
                                    batch_rows=4, shard_rows=8), progress=False, model=reference_model)
    return root, cache


@pytest.fixture
def shared_model(monkeypatch, reference_model):
    """`load_model("reference")` hands out the session's model (the rows test errors, not loading)."""
    import saelab.models

    real = saelab.models.load_model

    def load(name="reference", device="cpu", dtype="float32"):
        if name == "reference" and str(device) == "cpu" and str(dtype) == "float32":
            return reference_model
        return real(name, device=device, dtype=dtype)

    monkeypatch.setattr(saelab.models, "load_model", load)


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory):
    """A small sound SAE folder (cfg.json + sae_weights.safetensors + saelab.json)."""
    from saelab.config import SAEConfig
    from saelab.sae import SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(d_in=16, n_latents=32, k=4, hook_name=HOOK))
    sae.reset_parameters(seed=0)
    return sae.save(tmp_path_factory.mktemp("sae") / "sae")


@pytest.fixture(scope="module")
def neox_folder(tmp_path_factory):
    from tiny_models import build_family

    return build_family("pythia-70m", tmp_path_factory.mktemp("neox"))


def broken_sae(good: Path, dest: Path, how: str) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(good, dest)
    weights = dest / "sae_weights.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "bad_cfg":
        (dest / "cfg.json").write_text('{"d_in": 16,')
    elif how == "nan":
        state = load_file(weights)
        state["W_dec"][3, 1] = float("nan")
        save_file(state, str(weights))
    return dest


def truncated_copy(cache: Path, dest: Path) -> Path:
    shutil.copytree(cache, dest)
    victim = dest / HOOK / "acts-00001.npy"
    victim.write_bytes(victim.read_bytes()[:-1000])
    return dest


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_and_exit_2(case, tmp_path, monkeypatch, capsys, request):
    monkeypatch.chdir(tmp_path)  # default output folders (runs/..., cache/...) land here, under watch
    make_inputs(tmp_path)
    fill = {"tmp": str(tmp_path)}
    argv_text = " ".join(case.argv)
    if "{cache}" in argv_text or "{truncated}" in argv_text:
        root, cache = request.getfixturevalue("shared")
        fill["cache"] = str(cache)
        if "{truncated}" in argv_text:
            fill["truncated"] = str(truncated_copy(cache, tmp_path / "truncated"))
        shared_before = snapshot(root)
    for how in ("sound", "truncated", "bad_cfg", "nan"):
        if f"{{sae_{how}}}" in argv_text:
            fill[f"sae_{how}"] = str(broken_sae(request.getfixturevalue("sae_folder"), tmp_path / f"sae_{how}", how))
    if case.model:
        request.getfixturevalue("shared_model")
    if "{neox}" in argv_text:  # a tiny GPT-NeoX folder (parallel attention and MLP: no resid_mid)
        fill["neox"] = str(request.getfixturevalue("neox_folder"))
    if case.offline:
        monkeypatch.setattr("saelab.hub.hub_reachable", lambda *a, **k: False)
    capsys.readouterr()  # whatever the fixtures printed (a model's loading bar) is not the command's output
    before = snapshot(tmp_path)
    argv = [a.format(**fill) for a in case.argv]
    names = [n.format(**fill) for n in case.names]

    code, out, err = run_cli(capsys, argv)

    assert_one_error(code, err, names, case.hint)
    assert snapshot(tmp_path) == before, "files were left behind (or changed)"
    if "cache" in fill:
        assert snapshot(root) == shared_before, "the shared cache was changed"


# Commands whose own issue is still to add their rows (remove a command from here when you add its rows).
ROWS_PENDING: set[str] = set()


def test_the_table_covers_every_command():
    from saelab.cli import COMMANDS

    first_words = {c.argv[0] for c in CASES}
    missing = set(COMMANDS) - first_words - ROWS_PENDING
    assert not missing, f"commands without a bad-input row: {missing}"
    assert any(c.argv[:2] == ["cache", "verify"] for c in CASES)
    assert any(c.argv[:2] == ["reference", "train"] for c in CASES)
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


# ------------------------------------------------------------------------------------------------ the boundary
def _raising(exc):
    def run(args):
        raise exc
    return run


def test_a_library_error_is_one_line_and_exit_2(monkeypatch, capsys):
    from saelab.errors import DataError

    monkeypatch.setattr("saelab.cli.run_hooks", _raising(DataError("dataset 'x.txt' is bad", hint="use y")))
    code, out, err = run_cli(capsys, ["hooks"])
    assert code == 2 and out == ""
    assert err == "saelab hooks: error: dataset 'x.txt' is bad\nhint: use y\n"


def test_a_multi_line_message_is_joined_into_one_line(monkeypatch, capsys):
    from saelab.errors import CacheError

    monkeypatch.setattr("saelab.cli.run_hooks", _raising(CacheError("first\n  second\nthird")))
    code, _, err = run_cli(capsys, ["hooks"])
    assert code == 2 and err == "saelab hooks: error: first; second; third\n"


def test_an_unexpected_exception_is_a_bug_with_its_traceback_and_exit_1(monkeypatch, capsys):
    monkeypatch.setattr("saelab.cli.run_eval", _raising(ZeroDivisionError("division by zero")))
    code, out, err = run_cli(capsys, ["eval", "somewhere"])
    assert code == 1
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError: division by zero" in err
    assert err.rstrip().splitlines()[-1].startswith("saelab eval: internal error")
    # a plain ValueError is not a user error either: only SaelabError gets the one-line treatment
    monkeypatch.setattr("saelab.cli.run_eval", _raising(ValueError("oops")))
    code, _, err = run_cli(capsys, ["eval", "somewhere"])
    assert code == 1 and "Traceback" in err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_of_a_library_error(monkeypatch, capsys, how):
    from saelab.errors import ModelError

    monkeypatch.setattr("saelab.cli.run_hooks", _raising(ModelError("model 'm' is bad", hint="fix it")))
    if how == "env":
        monkeypatch.setenv("SAELAB_DEBUG", "1")
    code, _, err = run_cli(capsys, ["--debug", "hooks"] if how == "flag" else ["hooks"])
    assert code == 2
    assert "Traceback (most recent call last)" in err and "ModelError: model 'm' is bad" in err
    assert err.rstrip().splitlines()[-2:] == ["saelab hooks: error: model 'm' is bad", "hint: fix it"]
    monkeypatch.setenv("SAELAB_DEBUG", "0")
    code, _, err = run_cli(capsys, ["hooks"])
    assert code == 2 and "Traceback" not in err


def test_the_real_entry_point_prints_one_line_and_exits_2(tmp_path):
    """Two rows through real processes (`python -m saelab.cli`, run side by side), which also proves that nothing
    else reaches stdout or stderr."""
    (tmp_path / "notes.txt").write_text("x")
    env = {**os.environ, "SAELAB_DEBUG": "0"}
    rows = [(["cache", "verify", str(tmp_path / "nope")], "nope"),
            (["train", "--cache", str(tmp_path / "notes.txt")], "notes.txt")]
    before = snapshot(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "saelab.cli", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env) for argv, _ in rows]
    for p, (_, name) in zip(procs, rows):
        out, err = p.communicate(timeout=300)
        assert out == ""
        assert_one_error(p.returncode, err, [name])
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ numerical guards
def test_verify_names_the_shard_and_row_of_nan_and_inf(shared, tmp_path, capsys):
    """Non-finite values written as such (the checksums match) are found by `verify` and named by shard and row."""
    from saelab.activations.format import sha256_file

    _, cache = shared
    bad = tmp_path / "nan"
    shutil.copytree(cache, bad)
    rel = f"{HOOK}/acts-00001.npy"
    acts = np.load(bad / rel)
    acts[5, 3] = np.nan
    acts[9, 0] = np.inf
    np.save(bad / rel, acts)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["shards"][1]["files"][rel]["sha256"] = sha256_file(bad / rel)  # as if the writer had stored them
    (bad / "manifest.json").write_text(json.dumps(manifest))

    code, out, err = run_cli(capsys, ["cache", "verify", str(bad)])
    assert code == 1 and err == ""
    assert f"DAMAGED shard 1: {rel}: row 5 holds NaN or inf (2 of {acts.shape[0]} rows do)" in out
    assert "--dtype" in out  # rewriting as it was would repeat them: the fix is another dtype
    code, out, _ = run_cli(capsys, ["cache", "verify", str(cache)])
    assert code == 0 and "OK: 2 shards" in out


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_finite_rows_of_every_storage_dtype(dtype):
    """Row finiteness read from the stored bits agrees with torch.isfinite on the values themselves."""
    import torch

    from saelab.activations.format import to_storage
    from saelab.activations.format import _finite_rows

    x = torch.randn(64, 8) * 100
    x[3, 1], x[17, 7], x[40, 0], x[41, 2] = float("nan"), float("inf"), float("-inf"), 1e30  # 1e30: inf in fp16
    stored = to_storage(x, dtype)
    want = torch.isfinite(x.to(getattr(torch, dtype))).all(1).numpy()
    assert (_finite_rows(stored) == want).all()
    assert (~want).sum() == (4 if dtype == "float16" else 3)


# ------------------------------------------------------------------------------------------------ a cache's run
def test_a_run_from_a_cache_records_the_cache_model(shared, tmp_path):
    """Training from --cache takes the model (and corpus, context) named in the cache's manifest, not the --model
    default; a contradicting --model is refused (a table row)."""
    from saelab.config import TrainConfig
    from saelab.models import reference_dir
    from saelab.training.pipeline import resolve

    _, cache = shared
    other = tmp_path / "other"
    shutil.copytree(cache, other)
    m = json.loads((other / "manifest.json").read_text())
    m["spec"]["model"]["name"] = str(reference_dir())  # the same weights, named by path
    (other / "manifest.json").write_text(json.dumps(m))
    cfg = resolve(TrainConfig(cache=str(other), out=str(tmp_path / "run"), eval_tokens=0))
    assert cfg.model.name == str(reference_dir()) and cfg.sae.model_name == str(reference_dir())
    assert cfg.sae.hook_name == HOOK and cfg.context_size == T  # one hook field (issue 25)
    assert not (tmp_path / "run").exists()  # resolving writes nothing
