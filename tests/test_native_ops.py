"""The dispatcher's C++ kernels (``native_ops``): a call they cover gives the op's Python body's
bits (they call the same C function on the same buffers) without entering Python; every other
call reaches the Python body; a decision stays with the Python side (what it has not handed over
runs there); a compiled decode gives the same logits either way."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quarot_fx.kernels import native, native_ops
from quarot_fx.kernels.quantized_linear import pack_linear_weight
from quarot_fx.numerics.hadamard import hadamard_orders, hadamard_plan
from test_packed_attention import attention_inputs
from test_quant_kernels import linear_inputs
from tiny_models import tiny_model, token_ids

OPS = torch.ops.quarot_fx


@pytest.fixture(scope="module", autouse=True)
def loaded():
    if native.library() is None:
        pytest.skip(f"no C kernels: {native.unavailable_reason()}")
    assert native_ops.load(), native_ops.unavailable_reason()  # a C++ compiler is on every supported machine


def same(a, b) -> bool:
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    return all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def in_cpp(op, *args) -> tuple:
    """(the op's result, whether the C++ kernel ran its C function): the second call, after the
    Python body has handed over what it decided."""
    op(*args)
    before = native_ops.kernel_ns()
    result = op(*args)
    return result, native_ops.kernel_ns() > before


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 16), k=st.sampled_from([2, 8, 64, 66, 576]), n=st.integers(1, 40) | st.sampled_from([65, 130, 301]),
       bias=st.booleans(),
       out_dtype=st.sampled_from([torch.float32, torch.bfloat16]), lead=st.booleans(), seed=st.integers(0, 50))
def test_linear_gives_the_python_bodys_bits_from_cpp(rows, k, n, bias, out_dtype, lead, seed):
    codes, x_scale, w, w_scale, b = linear_inputs(rows, k, n, 1, seed, bias)
    if lead:  # [batch, rows, k]: the output keeps the leading dimensions
        codes, x_scale = codes.reshape(1, rows, k), x_scale.reshape(1, rows, 1)
    args = (codes, x_scale, pack_linear_weight(w, 1), w_scale, b, k, out_dtype, "int4", False)
    result, ran = in_cpp(OPS.quantized_linear.default, *args)
    assert ran
    assert same(result, OPS._quantized_linear_python.default(*args))


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from([n for n in hadamard_orders(1024) if n > 1]), inner=st.sampled_from([1, 4]),
       rows=st.integers(1, 40), seed=st.integers(0, 50))
def test_hadamard_gives_the_python_bodys_bits_from_cpp(n, inner, rows, seed):
    """A decode step's rows and a prefill's (blocks of 16 split over the threads) alike; a prefill's
    of a plan with a large Paley factor go to the Python body (its stage GEMMs)."""
    x = torch.randn(rows, 1, n * inner, generator=torch.Generator().manual_seed(seed))
    result, ran = in_cpp(OPS.hadamard_transform.default, x, inner)
    # the rule stated here, not imported: powers of two are butterflies, Paley factors up to 64 dense C loops
    small_paley = all(order & (order - 1) == 0 or order <= 64 for order in hadamard_plan(n).factors)
    assert ran == (rows <= native.FEW_ROWS or small_paley)
    assert same(result, OPS._hadamard_transform_python.default(x, inner))


@pytest.mark.parametrize("n", [12, 64, 576])
def test_a_gradient_through_the_cpp_autograd_layer_is_the_python_formulas(n):
    """Where a gradient is wanted the C++ autograd layer hands the call to the twin, which carries
    the op's Python formula (the transposed matrix: Paley factors are not symmetric)."""
    from quarot_fx.kernels.hadamard_transform import hadamard_transform_reference

    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, n, dtype=torch.float64)
    (OPS.hadamard_transform.default(x, 1) * weights).sum().backward()
    reference = x.detach().clone().requires_grad_()
    (hadamard_transform_reference(reference) * weights).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=0, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), length=st.integers(1, 70), heads=st.integers(1, 4), clip=st.sampled_from([1.0, 0.9]),
       seed=st.integers(0, 50))
def test_kv_quantize_gives_the_python_bodys_bits_from_cpp(bits, length, heads, clip, seed):
    x = torch.randn(1, heads, 1, length, generator=torch.Generator().manual_seed(seed)) * 3
    result, ran = in_cpp(OPS.kv_quantize.default, x, bits, clip)
    assert ran
    assert same(result, OPS._kv_quantize_python.default(x, bits, clip))


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 3), groups=st.integers(1, 3), rows=st.integers(1, 16),
       tokens=st.integers(1, 300), dim=st.sampled_from([8, 64]), bits=st.sampled_from([4, 8]),
       mask=st.sampled_from([None, "bool", "float"]), causal=st.booleans(), byte_zero=st.booleans(),
       seed=st.integers(0, 50))
def test_attention_gives_the_python_bodys_bits_from_cpp(batch, kv_heads, groups, rows, tokens, dim, bits, mask, causal,
                                                        byte_zero, seed):
    """Both call the C kernel once with torch's thread count (spans of 128 tokens, merged in a fixed
    order); the C++ kernel converts the mask and zero points itself."""
    q, *parts = attention_inputs(batch, kv_heads, groups, rows, tokens, dim, bits, seed, byte_zero)
    g = torch.Generator().manual_seed(seed)
    attn_mask = {None: None, "bool": torch.rand(batch, 1, rows, tokens, generator=g) > 0.3,
                 "float": torch.randn(1, kv_heads * groups, 1, tokens, generator=g)}[mask]
    args = (q, *parts, bits, dim, torch.float32, attn_mask, None, causal and mask is None, groups > 1)
    result, ran = in_cpp(OPS.packed_attention.default, *args)
    assert ran
    assert same(result, OPS._packed_attention_python.default(*args))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 16), k=st.sampled_from([3, 64, 65, 576]), n=st.sampled_from([1, 7, 64, 301]),
       bias=st.booleans(), spread=st.sampled_from([1e-3, 1.0, 300.0]), seed=st.integers(0, 50))
def test_w8a8_head_gives_the_python_bodys_bits_from_cpp(rows, k, n, bias, spread, seed):
    """The row codes made in C++ (max|x| / 127, round half to even) and the integer kernel: the
    Python body's bits; a row of zeros keeps scale 1."""
    from quarot_fx.kernels.int8_linear import int8_channel_codes

    g = torch.Generator().manual_seed(seed)
    codes, scale = int8_channel_codes(torch.randn(n, k, generator=g))
    x = torch.randn(1, rows, k, generator=g) * spread
    x[0, 0] = 0.0 if rows > 1 else x[0, 0]
    args = (x, codes, scale, torch.randn(n, generator=g) if bias else None)
    result, ran = in_cpp(OPS.int8_dynamic_linear.default, *args)
    assert ran
    assert same(result, OPS._int8_dynamic_linear_python.default(*args))


def test_a_w8a8_head_row_with_a_nan_goes_to_the_python_body():
    from quarot_fx.kernels.int8_linear import int8_channel_codes

    codes, scale = int8_channel_codes(torch.randn(5, 8))
    x = torch.randn(1, 8)
    x[0, 3] = float("nan")
    result, ran = in_cpp(OPS.int8_dynamic_linear.default, x, codes, scale, None)
    assert not ran
    assert result.isnan().all()  # the row's scale is NaN, as its float head's outputs would be


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 16), k=st.sampled_from([3, 64, 576]), n=st.sampled_from([1, 7, 64, 65, 301]),
       bias=st.booleans(), seed=st.integers(0, 50))
def test_int8_head_gives_the_python_bodys_bits_from_cpp(rows, k, n, bias, seed):
    """One row: the channels split over torch's threads; more rows: one C call, as the Python body."""
    from quarot_fx.kernels.int8_linear import int8_channel_codes

    g = torch.Generator().manual_seed(seed)
    codes, scale = int8_channel_codes(torch.randn(n, k, generator=g))
    args = (torch.randn(1, rows, k, generator=g), codes, scale, torch.randn(n, generator=g) if bias else None)
    result, ran = in_cpp(OPS.int8_weight_linear.default, *args)
    assert ran
    assert same(result, OPS._int8_weight_linear_python.default(*args))


def test_what_cpp_does_not_cover_runs_the_python_body():
    """Many rows of a linear, or a float64 transform, never run in C: no C call from C++, and the Python
    body's result. A non-finite KV vector: the C kernel declines and the Python body decides, as it
    would alone."""
    codes, x_scale, w, w_scale, b = linear_inputs(17, 64, 8, 1)
    many = (codes, x_scale, pack_linear_weight(w, 1), w_scale, b, 64, torch.float32, "int4", False)
    wide = torch.randn(17, 12, dtype=torch.float64)  # float64: the stage GEMMs, never the C stages
    for op, twin, args in [(OPS.quantized_linear, OPS._quantized_linear_python, many),
                           (OPS.hadamard_transform, OPS._hadamard_transform_python, (wide, 1))]:
        result, ran = in_cpp(op.default, *args)
        assert not ran, op
        assert same(result, twin.default(*args))
    x = torch.randn(2, 1, 64)
    x[1, 0, 3] = float("nan")
    found, expected = OPS.kv_quantize.default(x, 4, 1.0), OPS._kv_quantize_python.default(x, 4, 1.0)
    assert found[1][1].isnan().all()
    assert same(tuple(t.nan_to_num() for t in found), tuple(t.nan_to_num() for t in expected))


def test_a_shape_is_served_only_under_the_policy_it_was_decided_for():
    codes, x_scale, w, w_scale, b = linear_inputs(2, 64, 8, 1, seed=3)
    args = [codes, x_scale, pack_linear_weight(w, 1), w_scale, b, 64, torch.float32, "int4", False]
    assert in_cpp(OPS.quantized_linear.default, *args)[1]
    args[7] = "float"  # the float emulation: the Python body never hands it over
    result, ran = in_cpp(OPS.quantized_linear.default, *args)
    assert not ran and same(result, OPS._quantized_linear_python.default(*args))


def test_native_timed_counts_the_c_time_spent_from_cpp():
    """speed.py's kernel/overhead split: C time reached from C++ counts as kernel time."""
    x = torch.randn(1, 1, 576)
    OPS.hadamard_transform.default(x, 1)
    with native.timed() as elapsed:
        assert in_cpp(OPS.hadamard_transform.default, x, 1)[1]
    assert elapsed[0] > 0


def test_suspended_keeps_every_call_in_python_and_binds_again_after():
    x = torch.randn(1, 1, 576)
    OPS.hadamard_transform.default(x, 1)
    with native_ops.suspended():
        assert not in_cpp(OPS.hadamard_transform.default, x, 1)[1]
    assert in_cpp(OPS.hadamard_transform.default, x, 1)[1]


def test_a_compiled_decode_gives_the_same_logits_with_and_without_the_cpp_kernels():
    import quarot_fx

    model, prompt = tiny_model("llama"), token_ids()

    def greedy():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="quarot", options={"preset": "w4a4kv4"})
        with torch.no_grad():
            out = compiled(prompt, use_cache=True)
            logits = [out.logits]
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                out = compiled(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                logits.append(out.logits)
        return logits

    assert quarot_fx  # the backend is registered by the import
    before = native_ops.kernel_ns()
    fast = greedy()
    assert native_ops.kernel_ns() > before  # the decode steps ran C from C++
    with native_ops.suspended():
        slow = greedy()
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def test_switched_off_by_the_environment_with_the_reason():
    script = ("from quarot_fx.kernels import native_ops; import torch; assert not native_ops.load(); "
              "print(native_ops.unavailable_reason())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, native_ops.ENVIRONMENT: "0"}).stdout
    assert "QUAROT_FX_NATIVE_OPS=0" in out


def test_the_c_kernels_threads_are_torchs_pool_threads_with_the_same_bits():
    """Loading the C++ kernels hands native.c a runner that puts the jobs of its threaded kernels
    (a prefill's int4 GEMM, Hadamard rows, the 8-bit head) on torch's OpenMP pool instead of
    threads of their own (which shared the cores with the pool's spinning threads). Every job
    goes through it, and the results are the bits of the kernels' own threads and of one thread."""
    import ctypes

    from quarot_fx.kernels.hadamard_transform import _c_plan
    from quarot_fx.kernels.int8_linear import int8_channel_codes

    lib, threads = native.library(), torch.get_num_threads()
    assert lib.job_runner_in_use() == OPS._native_pool_runner()  # installed when the kernels were bound
    runner_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64)
    pool = runner_type(OPS._native_pool_runner())
    jobs = []
    counting = runner_type(lambda *args: jobs.append(args[3]) or pool(*args))
    codes, x_scale, w, w_scale, b = linear_inputs(300, 576, 1000, 1, 0, True)
    orders, matrices, scale = _c_plan(576, hadamard_plan(576).factors)
    x = torch.randn(4096, 576, generator=torch.Generator().manual_seed(1))
    head_codes, head_scale = int8_channel_codes(torch.randn(3000, 576, generator=torch.Generator().manual_seed(2)))

    def run(runner, count):
        lib.set_job_runner(ctypes.cast(runner, ctypes.c_void_p) if runner is not None else None)
        torch.set_num_threads(count)
        return (native.int4_linear(codes, x_scale, pack_linear_weight(w, 1), w_scale, b, 576),
                native.hadamard_rows(x, orders, matrices, scale),
                native.int8_weight_linear(x[:1], head_codes, head_scale, None, count))

    try:
        on_pool = run(counting, 2)
        assert len(jobs) == 3 and all(count == 2 for count in jobs)  # all three kernels, on two threads
        assert same(on_pool, run(None, 2))  # threads of their own
        assert same(on_pool, run(pool, 1))  # one thread: the runner is not even asked
        assert len(jobs) == 3
    finally:
        torch.set_num_threads(threads)
        lib.set_job_runner(OPS._native_pool_runner())  # the pool runner again
