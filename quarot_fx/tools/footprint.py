"""What a model costs to run: bytes of its weights and KV cache, its decode speed, and the CPU
that gave the figures. Shared by ``benchmarks/speed.py`` and the demo, so both count alike."""

from __future__ import annotations

import time

import torch

QUANTIZED_LINEAR = "quarot_fx.quantized_linear.default"


def cpu_summary() -> str:
    """Which CPU gave a figure: model name and the integer-GEMM flags that change what is fast."""
    try:
        info = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return "CPU: unknown"
    from ..kernels.int_gemm import cpu_flags

    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"CPU: {model}, flags {' '.join(cpu_flags()) or 'none of avx2/avx512_vnni/amx_int8'}"


def plain_tensors(t):
    """The storage-backed tensors behind ``t``: itself, or a subclass's inner tensors (torchao's
    quantized weights are wrapper subclasses without a storage of their own)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return [inner for name in names for inner in plain_tensors(getattr(t, name))]
    return [t]


def unique_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once."""
    seen, total = set(), 0
    for t in (inner for tensor in tensors for inner in plain_tensors(tensor)):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of an (uncompiled) model's parameters and buffers."""
    return unique_bytes(list(model.parameters()) + list(model.buffers()))


def fp16_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the same parameters would hold in fp16."""
    return 2 * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def quarot_weight_bytes(reports) -> dict:
    """Bytes of the constants the compiled graphs hold (shared across recompiles), and the
    quantized linears' packed weights + scales against the fp16 bytes of the same matrices."""
    constants, packed, fp16 = [], [], 0
    seen_linear = set()
    for report in reports:
        gm = report.graph_module
        constants += [b for _, b in gm.named_buffers()]
        for node in gm.graph.nodes:
            if str(node.target) != QUANTIZED_LINEAR:
                continue
            weight, scale = getattr(gm, node.args[2].target), getattr(gm, node.args[3].target)
            if weight.data_ptr() in seen_linear:
                continue
            seen_linear.add(weight.data_ptr())
            packed += [weight, scale]
            fp16 += 2 * weight.shape[0] * node.args[5]
    return {"weight_bytes": unique_bytes(constants), "quantized_linear_bytes": unique_bytes(packed),
            "quantized_linear_fp16_bytes": fp16}


def cache_bytes(cache) -> int:
    """Bytes of the tensors a KV cache holds."""
    return unique_bytes(t for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor))


def prefill_cache_bytes(model, ids) -> int:
    """Bytes of the tensors the model's KV cache holds after a prefill of ``ids``."""
    with torch.no_grad():
        return cache_bytes(model(ids, use_cache=True, logits_to_keep=1).past_key_values)


def fp16_cache_bytes(config, tokens: int) -> int:
    """Bytes an fp16 cache of ``tokens`` tokens holds (keys and values of every layer)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * 2


def decode_cache(model, tokens: int, kind: str):
    """The cache decode runs with: None (the model's default, a growing ``DynamicCache``; quarot's
    packed one) or a ``StaticCache`` of ``tokens`` slots (quarot's ``PackedStaticKVCache``: one
    decode graph for every position, written in place)."""
    if kind == "dynamic":
        return None
    if kind != "static":
        raise ValueError(f"cache kind must be 'static' or 'dynamic'; got {kind!r}")
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=tokens)


def decode_seconds(model, prompt, steps: int, cache_kind: str = "static") -> float:
    """Seconds for ``steps`` greedy decode steps after prefilling ``prompt`` (prefill not timed)."""
    with torch.no_grad():
        cache = decode_cache(model, prompt.shape[1] + steps + 1, cache_kind)
        out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - start
