"""Tiny random-initialised models of six transformers families, saved as local folders with the reference model's
tokenizer: 2 layers, d_model 64, 4 heads, the reference vocabulary (8192 tokens), a context of 128. A few MB each,
built in about a second. Used by test_model_families.py and the bad-input table.

The GPT-NeoX model is saved as `pythia-70m`, a name TransformerLens also knows as an alias of the hub's
EleutherAI/pythia-70m (6 layers, d_model 512): a folder of that name must load as itself.
"""

from __future__ import annotations

from pathlib import Path

_ROPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128)

# folder name → (transformers config class, its arguments)
FAMILIES = {
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "pythia-70m": ("GPTNeoXConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=256, max_position_embeddings=128, rotary_pct=0.25)),
    "llama": ("LlamaConfig", _ROPE),
    "gemma2": ("Gemma2Config", {**_ROPE, "head_dim": 16}),
    "qwen2": ("Qwen2Config", _ROPE),
    "mistral": ("MistralConfig", _ROPE),
}
N_LAYERS, D_MODEL, N_CTX = 2, 64, 128

# where plain transformers keeps the decoder layers and the final norm (for reference computations)
_MODULES = {"gpt2": ("transformer.h", "transformer.ln_f"), "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm")}


def build_family(name: str, root: Path, seed: int = 0) -> Path:
    """Save the tiny model of FAMILIES[name] and the reference tokenizer into root/name; returns the folder."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saelab.models import reference_dir

    tokenizer = AutoTokenizer.from_pretrained(reference_dir())
    config_class, kwargs = FAMILIES[name]
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                 eos_token_id=tokenizer.eos_token_id, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norm gains and biases away from their init (1 or 0), so that using them matters
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    out = Path(root) / name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def hf_model(folder: Path):
    """The folder's model through plain transformers, float32, eager attention (what the bridge runs)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


def hf_layers(model):
    """(decoder layers, final norm) modules of a plain transformers model."""
    layers, norm = _MODULES.get(model.config.model_type, ("model.layers", "model.norm"))
    return model.get_submodule(layers), model.get_submodule(norm)
