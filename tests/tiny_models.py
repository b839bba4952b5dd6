"""Tiny random-weight decoders of seven architectures, built from transformers configs (no hub)."""

from __future__ import annotations

import torch
import transformers as tf

ARCHITECTURES = ("llama", "mistral", "qwen2", "phi3", "gemma", "opt", "gpt2")


def tiny_config(arch: str, hidden: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2,
                ffn: int = 128, vocab: int = 128):
    common = dict(vocab_size=vocab, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama_like = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, **common)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if arch == "phi3":
        return tf.Phi3Config(**llama_like)
    if arch == "gemma":
        return tf.GemmaConfig(**llama_like, head_dim=hidden // heads)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers,
                            num_attention_heads=heads, word_embed_proj_dim=hidden, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn,
                             vocab_size=vocab, n_positions=256, bos_token_id=1, eos_token_id=2)
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, trainable: bool = False,
               attn_implementation: str = "sdpa", **sizes) -> torch.nn.Module:
    """A deterministic random-weight causal LM in eval mode, with non-trivial norm weights.

    Frozen (``requires_grad=False``) unless ``trainable``: the backend compiles for inference
    and refuses grad mode with trainable parameters (tested on its own)."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch, **sizes), attn_implementation=attn_implementation)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:  # norm scales and biases: make them matter
                param.copy_(torch.randn_like(param) * 0.2 + (0.0 if "bias" in name or arch == "gemma" else 1.0))
    return model.to(dtype).eval().requires_grad_(trainable)


def token_ids(vocab: int = 128, length: int = 12, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)
