/* CPU kernels of quarot_fx's hot ops, registered with torch's dispatcher, so that a compiled
 * graph's call reaches the C kernels (native.c) without entering Python.
 *
 * Why: a decode step calls these ops hundreds of times with a few rows each; through the ops'
 * Python bodies each call costs 30-60 us of dispatch, checks and ctypes, more than its kernel.
 * Here a call costs a few microseconds on top of the kernel.
 *
 * What runs here is exactly what the Python body would run: the same C function of the same
 * library (its address handed over by native_ops.py, _native_bind), on the same buffers, so the
 * same bits. Where a call is not a case this file covers (many rows, another dtype, a layout,
 * a shape the Python side has not decided for), it goes to the op's Python body, registered as
 * quarot_fx::_<op>_python: the Python side stays the one place that decides. The decisions this
 * file needs are handed over by it on first use: that a linear's shape runs the int4 GEMV
 * (int_gemm's measured choice) and each Hadamard order's factor plan. */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace {

using Stack = torch::jit::Stack;

typedef void (*GemvFn)(const int8_t *, const float *, const uint8_t *, const float *, const float *, float *,
                       int64_t, int64_t, int64_t);
typedef int (*HadamardFn)(const float *, float *, int64_t, int64_t, int64_t, const int64_t *, const float *const *,
                          float, int64_t);
typedef int (*AttentionFn)(const float *, const uint8_t *, const float *, const float *, const uint8_t *,
                           const float *, const float *, float *, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t, float, int64_t, const float *, int64_t, int64_t, int64_t, int64_t);
typedef int (*KvQuantizeFn)(const float *, uint8_t *, float *, float *, int64_t, int64_t, int64_t, int64_t, float,
                            int64_t, int64_t);
typedef void (*Int8LinearFn)(const float *, const int8_t *, const float *, const float *, float *, int64_t, int64_t,
                             int64_t, int64_t);
typedef void (*Int8CodesFn)(const int8_t *, const float *, const int8_t *, const float *, const float *, float *,
                            int64_t, int64_t, int64_t, int64_t);

struct Kernels {
    GemvFn gemv = nullptr;
    HadamardFn hadamard = nullptr;
    KvQuantizeFn kv_quantize = nullptr;
    AttentionFn attention = nullptr;
    Int8LinearFn int8_linear = nullptr;
    Int8CodesFn int8_codes = nullptr;
    int64_t few_rows = 0;
};

struct Plan {  // native.hadamard_rows's arguments for one (n, inner)
    std::vector<int64_t> orders;
    std::vector<at::Tensor> keep;  // the Paley factors' matrices, alive as long as the plan
    std::vector<const float *> matrices;
    float scale = 1.0f;
    bool many_rows = true;  // beyond few_rows too (else the Python body's stage GEMMs take those)
};

Kernels kernels;  // all null until _native_bind: every call then goes to Python
std::mutex guard;  // over the two tables below (written on first use of a shape, read every call)
std::map<std::pair<int64_t, int64_t>, Plan> plans;  // (n, inner) -> plan
std::map<std::tuple<int64_t, int64_t, int64_t, std::string>, bool> gemv_shapes;  // (rows, in, out, gemm policy)
std::atomic<int64_t> kernel_ns{0};  // time inside the C kernels (speed.py's kernel/overhead split)

template <class F>
auto timed(F &&run) {
    const auto start = std::chrono::steady_clock::now();
    auto result = run();
    kernel_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
    return result;
}

void python_body(const char *twin, Stack *stack) {
    c10::Dispatcher::singleton().findSchemaOrThrow(twin, "").callBoxed(stack);
}

/* An op's CPU kernel: its fast path where it covers the call, else the op's Python body. */
template <bool (*fast)(Stack *), const char *twin>
void fast_or_python(const c10::OperatorHandle &, Stack *stack) {
    if (!fast(stack)) python_body(twin, stack);
}

constexpr char linear_twin[] = "quarot_fx::_quantized_linear_python";
constexpr char hadamard_twin[] = "quarot_fx::_hadamard_transform_python";
constexpr char kv_quantize_twin[] = "quarot_fx::_kv_quantize_python";
constexpr char attention_twin[] = "quarot_fx::_packed_attention_python";
constexpr char int8_linear_twin[] = "quarot_fx::_int8_weight_linear_python";
constexpr char int8_dynamic_twin[] = "quarot_fx::_int8_dynamic_linear_python";

/* Output channels split into blocks of this many for torch's threads (a multiple of the GEMVs'
 * four channels at a time): every channel is computed as by one call over all, so the same bits. */
constexpr int64_t CHANNEL_BLOCK = 64;

template <class F>
void over_channel_blocks(int64_t channels, F &&run) {  // run(first, count) on torch's threads
    const int64_t blocks = (channels + CHANNEL_BLOCK - 1) / CHANNEL_BLOCK;
    at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
        const int64_t start = first * CHANNEL_BLOCK, stop = std::min(channels, last * CHANNEL_BLOCK);
        run(start, stop - start);
    });
}

bool cpu_tensor(const c10::IValue &value, at::ScalarType dtype) {
    if (!value.isTensor()) return false;
    const at::Tensor &t = value.toTensor();
    return t.device().is_cpu() && t.scalar_type() == dtype && !t.is_neg() && !t.is_conj();
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
    std::vector<int64_t> out(sizes.begin(), sizes.end());
    out.back() = last;
    return out;
}

/* quantized_linear(x, x_scale, weight, weight_scale, bias, in_features, out_dtype, gemm, keep_unpacked):
 * the int4 GEMV on int8 codes of up to few_rows rows, one scale per output channel. */
bool linear_fast(Stack *stack) {
    auto args = torch::jit::last(*stack, 9);
    if (!kernels.gemv || !cpu_tensor(args[0], at::kChar) || !cpu_tensor(args[1], at::kFloat) ||
        !cpu_tensor(args[2], at::kByte) || !cpu_tensor(args[3], at::kFloat) || !args[5].isInt() || !args[7].isString())
        return false;
    const bool has_bias = !args[4].isNone();
    if (has_bias && !cpu_tensor(args[4], at::kFloat)) return false;
    const at::Tensor &x = args[0].toTensor(), &x_scale = args[1].toTensor(), &weight = args[2].toTensor(),
                     &weight_scale = args[3].toTensor();
    const int64_t in_features = args[5].toInt(), out_features = weight.dim() == 2 ? weight.size(0) : -1;
    if (x.dim() < 1 || in_features < 2 || x.size(-1) != in_features || out_features < 1) return false;
    const int64_t rows = x.numel() / in_features;
    if (rows < 1 || rows > kernels.few_rows || x_scale.numel() != rows || weight.size(1) != (in_features + 1) / 2 ||
        weight_scale.dim() != 2 || weight_scale.size(0) != out_features || weight_scale.size(1) != 1 ||
        (has_bias && (args[4].toTensor().dim() != 1 || args[4].toTensor().size(0) != out_features)))
        return false;
    {
        std::lock_guard<std::mutex> lock(guard);
        if (!gemv_shapes.count({rows, in_features, out_features, std::string(args[7].toStringRef())})) return false;
    }
    const auto out_dtype = static_cast<at::ScalarType>(args[6].toInt());
    const at::Tensor codes = x.contiguous(), scales = x_scale.contiguous(), packed = weight.contiguous(),
                     channel = weight_scale.contiguous();
    const at::Tensor bias = has_bias ? args[4].toTensor().contiguous() : at::Tensor();
    at::Tensor y = at::empty({rows, out_features}, x.options().dtype(at::kFloat));
    const int64_t half = in_features / 2;  // native.c's bytes per weight row
    timed([&] {
        if (rows == 1 && in_features % 2 == 0)  // one row (a decode step): the channels on torch's threads
            over_channel_blocks(out_features, [&](int64_t first, int64_t count) {
                kernels.gemv(codes.data_ptr<int8_t>(), scales.data_ptr<float>(), packed.data_ptr<uint8_t>() + first * half,
                             channel.data_ptr<float>() + first, has_bias ? bias.data_ptr<float>() + first : nullptr,
                             y.data_ptr<float>() + first, 1, in_features, count);
            });
        else
            kernels.gemv(codes.data_ptr<int8_t>(), scales.data_ptr<float>(), packed.data_ptr<uint8_t>(),
                         channel.data_ptr<float>(), has_bias ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(),
                         rows, in_features, out_features);
        return 0;
    });
    if (out_dtype != at::kFloat) y = y.to(out_dtype);
    y = y.view(with_last(x.sizes(), out_features));
    torch::jit::drop(*stack, 9);
    torch::jit::push(*stack, std::move(y));
    return true;
}

/* hadamard_transform(x, inner): float32, an order whose plan was handed over; a decode step's rows, and
 * more where the plan allows (the C stages split them over torch's thread count). */
bool hadamard_fast(Stack *stack) {
    auto args = torch::jit::last(*stack, 2);
    if (!kernels.hadamard || !cpu_tensor(args[0], at::kFloat) || !args[1].isInt()) return false;
    const at::Tensor &x = args[0].toTensor();
    if (x.dim() < 1 || x.size(-1) < 1) return false;
    const int64_t n = x.size(-1), rows = x.numel() / n;
    if (rows < 1) return false;
    const Plan *plan;
    {
        std::lock_guard<std::mutex> lock(guard);
        auto found = plans.find({n, args[1].toInt()});
        if (found == plans.end()) return false;
        plan = &found->second;  // std::map nodes never move; plans are never erased while bound
    }
    if (rows > kernels.few_rows && !plan->many_rows) return false;
    const at::Tensor input = x.contiguous();
    at::Tensor out = at::empty(input.sizes(), input.options());
    const int failed = timed([&] {
        return kernels.hadamard(input.data_ptr<float>(), out.data_ptr<float>(), rows, n,
                                static_cast<int64_t>(plan->orders.size()), plan->orders.data(), plan->matrices.data(),
                                plan->scale, at::get_num_threads());
    });
    if (failed) return false;
    torch::jit::drop(*stack, 2);
    torch::jit::push(*stack, std::move(out));
    return true;
}

/* The op's autograd layer on CPU: its Python formula (on the twin, which carries it too) where a
 * gradient is wanted, else straight on to the CPU kernel above; the Python layer alone cost more
 * than a decode step's Hadamard. */
void hadamard_transform_autograd(const c10::OperatorHandle &op, c10::DispatchKeySet keys, Stack *stack) {
    const c10::IValue &x = (*stack)[stack->size() - 2];
    if (c10::GradMode::is_enabled() && x.isTensor() && x.toTensor().requires_grad())
        python_body(hadamard_twin, stack);
    else
        op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

/* kv_quantize(x, bits, clip): float32 vectors, every value finite (else the Python body decides). */
bool kv_quantize_fast(Stack *stack) {
    auto args = torch::jit::last(*stack, 3);
    if (!kernels.kv_quantize || !cpu_tensor(args[0], at::kFloat) || !args[1].isInt() || !args[2].isDouble())
        return false;
    const at::Tensor &x = args[0].toTensor();
    const int64_t bits = args[1].toInt();
    const double clip = args[2].toDouble();
    if (x.dim() < 1 || x.numel() == 0 || bits < 2 || bits > 8 || !(clip > 0.0 && clip <= 1.0)) return false;
    const int64_t length = x.size(-1), rows = x.numel() / length, packed = bits <= 4;
    const int64_t row_bytes = packed ? (length + 1) / 2 : length;
    const at::Tensor input = x.contiguous();
    at::Tensor codes = at::empty(with_last(x.sizes(), row_bytes), x.options().dtype(at::kByte));
    at::Tensor scale = at::empty(with_last(x.sizes(), 1), x.options());
    at::Tensor zero = at::empty(with_last(x.sizes(), 1), x.options());
    const int failed = timed([&] {
        return kernels.kv_quantize(input.data_ptr<float>(), codes.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                                   zero.data_ptr<float>(), rows, length, row_bytes, bits, static_cast<float>(clip),
                                   packed, at::get_num_threads());
    });
    if (failed) return false;
    torch::jit::drop(*stack, 3);
    torch::jit::push(*stack, std::move(codes), std::move(scale), std::move(zero));
    return true;
}

/* A cache's zero points as the float32 the C kernel reads: uint8 ones (the packed cache's) converted
 * by a plain loop, a few microseconds cheaper per call than Tensor::to's dispatch. */
at::Tensor float_zeros(const at::Tensor &zero) {
    if (zero.scalar_type() == at::kFloat) return zero.contiguous();
    const at::Tensor bytes = zero.contiguous();
    at::Tensor out = at::empty(bytes.sizes(), bytes.options().dtype(at::kFloat));
    const uint8_t *in = bytes.data_ptr<uint8_t>();
    float *o = out.data_ptr<float>();
    for (int64_t i = 0; i < out.numel(); i++) o[i] = in[i];
    return out;
}

/* packed_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, length, dtype, attn_mask, scale,
 * is_causal, enable_gqa): float32 queries of up to few_rows rows over one scale and zero point per
 * cached vector, the conditions of packed_attention.takes_kernel; the mask as native.packed_attention
 * passes it (boolean: 0 or -inf; broadcast by strides; materialized where its last stride is not 1). */
bool attention_fast(Stack *stack) {
    auto args = torch::jit::last(*stack, 14);
    if (!kernels.attention || !cpu_tensor(args[0], at::kFloat) || !cpu_tensor(args[1], at::kByte) ||
        !cpu_tensor(args[2], at::kFloat) || !cpu_tensor(args[4], at::kByte) || !cpu_tensor(args[5], at::kFloat) ||
        !args[7].isInt() || !args[8].isInt() || !(args[11].isNone() || args[11].isDouble()))
        return false;
    for (int zero : {3, 6})
        if (!cpu_tensor(args[zero], at::kFloat) && !cpu_tensor(args[zero], at::kByte)) return false;
    const at::Tensor &q = args[0].toTensor(), &k_codes = args[1].toTensor();
    const int64_t bits = args[7].toInt(), length = args[8].toInt();
    const bool causal = args[12].toBool(), gqa = args[13].toBool(), has_mask = !args[10].isNone();
    if (bits < 2 || bits > 8 || static_cast<at::ScalarType>(args[9].toInt()) != at::kFloat || (has_mask && causal) ||
        q.dim() != 4 || k_codes.dim() != 4)
        return false;
    const int64_t batch = q.size(0), q_heads = q.size(1), rows = q.size(2);
    const int64_t kv_heads = k_codes.size(1), tokens = k_codes.size(2), row_bytes = k_codes.size(3);
    if (rows < 1 || rows > kernels.few_rows || q.size(3) != length || k_codes.size(0) != batch || tokens < 1 ||
        kv_heads < 1 || !(q_heads == kv_heads || (gqa && q_heads % kv_heads == 0)))
        return false;
    for (int part : {2, 3, 4, 5, 6}) {
        const at::Tensor &t = args[part].toTensor();
        if (t.dim() != 4 || t.size(0) != batch || t.size(1) != kv_heads || t.size(2) != tokens) return false;
        if (part != 4 && t.size(3) != 1) return false;
    }
    if (args[4].toTensor().size(3) != row_bytes) return false;
    const int64_t target[4] = {batch, q_heads, rows, tokens};
    at::Tensor mask;
    if (has_mask) {
        if (!cpu_tensor(args[10], at::kFloat) && !cpu_tensor(args[10], at::kBool)) return false;
        const at::Tensor &given = args[10].toTensor();
        if (given.dim() > 4) return false;
        for (int64_t i = 1; i <= given.dim(); i++)
            if (given.size(-i) != 1 && given.size(-i) != target[4 - i]) return false;
        mask = given;
        if (given.scalar_type() == at::kBool) {  // True: attend (0), False: -inf
            const at::Tensor flags = given.contiguous();
            mask = at::empty(given.sizes(), given.options().dtype(at::kFloat));
            const bool *in = flags.data_ptr<bool>();
            float *o = mask.data_ptr<float>();
            for (int64_t i = 0; i < mask.numel(); i++) o[i] = in[i] ? 0.0f : -std::numeric_limits<float>::infinity();
        }
        mask = mask.expand(at::IntArrayRef(target, 4));
        if (mask.stride(3) != 1) mask = mask.contiguous();
    }
    const at::Tensor query = q.contiguous(), kc = k_codes.contiguous(), ks = args[2].toTensor().contiguous(),
                     vc = args[4].toTensor().contiguous(), vs = args[5].toTensor().contiguous();
    const at::Tensor kz = float_zeros(args[3].toTensor()), vz = float_zeros(args[6].toTensor());
    const double scale = args[11].isNone() ? 1.0 / std::sqrt(static_cast<double>(length)) : args[11].toDouble();
    at::Tensor out = at::empty(query.sizes(), query.options());
    // One C call: its units (spans of a kv head's tokens) on torch's threads, the same bits on any count.
    const float *mask_data = has_mask ? mask.data_ptr<float>() : nullptr;
    const int64_t mb = has_mask ? mask.stride(0) : 0, mh = has_mask ? mask.stride(1) : 0,
                  mr = has_mask ? mask.stride(2) : 0;
    int failed = 0;
    timed([&] {
        failed = kernels.attention(query.data_ptr<float>(), kc.data_ptr<uint8_t>(), ks.data_ptr<float>(),
                                   kz.data_ptr<float>(), vc.data_ptr<uint8_t>(), vs.data_ptr<float>(),
                                   vz.data_ptr<float>(), out.data_ptr<float>(), batch, q_heads, kv_heads, rows, tokens,
                                   length, row_bytes, bits <= 4, static_cast<float>(scale), causal, mask_data, mb, mh,
                                   mr, at::get_num_threads());
        return 0;
    });
    if (failed) return false;
    torch::jit::drop(*stack, 14);
    torch::jit::push(*stack, std::move(out));
    return true;
}

/* The two heads' arguments (x, weight, scale, bias) where a fast path covers them: float32 x of up
 * to few_rows rows, int8 weight [n, k], float32 scale [n, 1] and bias [n] or None. */
bool head_arguments(const c10::ArrayRef<c10::IValue> &args, int64_t &k, int64_t &n, int64_t &rows) {
    if (!cpu_tensor(args[0], at::kFloat) || !cpu_tensor(args[1], at::kChar) || !cpu_tensor(args[2], at::kFloat) ||
        !(args[3].isNone() || cpu_tensor(args[3], at::kFloat)))
        return false;
    const at::Tensor &x = args[0].toTensor(), &weight = args[1].toTensor(), &scale = args[2].toTensor();
    if (weight.dim() != 2 || x.dim() < 1 || x.size(-1) != weight.size(1) || weight.size(1) < 1) return false;
    k = weight.size(1), n = weight.size(0), rows = x.numel() / k;
    return rows >= 1 && rows <= kernels.few_rows && scale.dim() == 2 && scale.size(0) == n && scale.size(1) == 1 &&
           (args[3].isNone() || (args[3].toTensor().dim() == 1 && args[3].toTensor().size(0) == n));
}

/* int8_weight_linear(x, weight, scale, bias): the 8-bit head at decode, float32 x of up to few_rows
 * rows (as the Python body's C path); one row splits the channels over torch's threads. */
bool int8_linear_fast(Stack *stack) {
    auto args = torch::jit::last(*stack, 4);
    int64_t k, n, rows;
    if (!kernels.int8_linear || !head_arguments(args, k, n, rows)) return false;
    const at::Tensor &x = args[0].toTensor(), &weight = args[1].toTensor(), &scale = args[2].toTensor();
    const at::Tensor input = x.contiguous(), codes = weight.contiguous(), scales = scale.contiguous();
    const at::Tensor bias = args[3].isNone() ? at::Tensor() : args[3].toTensor().contiguous();
    const float *b = bias.defined() ? bias.data_ptr<float>() : nullptr;
    at::Tensor y = at::empty({rows, n}, input.options());
    timed([&] {
        if (rows == 1)
            over_channel_blocks(n, [&](int64_t first, int64_t count) {
                kernels.int8_linear(input.data_ptr<float>(), codes.data_ptr<int8_t>() + first * k,
                                    scales.data_ptr<float>() + first, b ? b + first : nullptr, y.data_ptr<float>() + first,
                                    1, k, count, 1);
            });
        else
            kernels.int8_linear(input.data_ptr<float>(), codes.data_ptr<int8_t>(), scales.data_ptr<float>(), b,
                                y.data_ptr<float>(), rows, k, n, at::get_num_threads());
        return 0;
    });
    y = y.view(with_last(x.sizes(), n));
    torch::jit::drop(*stack, 4);
    torch::jit::push(*stack, std::move(y));
    return true;
}

/* int8_dynamic_linear(x, weight, scale, bias): the w8a8 head at decode. x's rows (float32, up to
 * few_rows, all finite: a NaN or Inf goes to the Python body, whose codes of it are torch's) become
 * int8 codes here with head_activation_codes' arithmetic, each step the same float32 operation as
 * torch's: scale = max|x| / 127 (1 for an all-zero row), code = clamp(round-half-even(x / scale),
 * -128, 127); then the C kernel int8_codes_linear, as the Python body calls it. */
bool int8_dynamic_fast(Stack *stack) {
    auto args = torch::jit::last(*stack, 4);
    int64_t k, n, rows;
    if (!kernels.int8_codes || !head_arguments(args, k, n, rows)) return false;
    const at::Tensor &x = args[0].toTensor(), &weight = args[1].toTensor(), &scale = args[2].toTensor();
    const at::Tensor input = x.contiguous();
    const float *in = input.data_ptr<float>();
    at::Tensor codes = at::empty({rows, k}, input.options().dtype(at::kChar));
    at::Tensor row_scale = at::empty({rows, 1}, input.options());
    int8_t *code = codes.data_ptr<int8_t>();
    float *xs = row_scale.data_ptr<float>();
    for (int64_t r = 0; r < rows; r++) {
        float most = 0.0f;
        for (int64_t i = 0; i < k; i++) {
            const float v = in[r * k + i];
            if (!std::isfinite(v)) return false;
            most = std::max(most, std::fabs(v));
        }
        const float s = most / 127.0f;
        xs[r] = s == 0.0f ? 1.0f : s;
        for (int64_t i = 0; i < k; i++) {
            const float rounded = std::nearbyint(in[r * k + i] / xs[r]);
            code[r * k + i] = static_cast<int8_t>(std::min(127.0f, std::max(-128.0f, rounded)));
        }
    }
    const at::Tensor w = weight.contiguous(), scales = scale.contiguous();
    const at::Tensor bias = args[3].isNone() ? at::Tensor() : args[3].toTensor().contiguous();
    at::Tensor y = at::empty({rows, n}, input.options());
    timed([&] {
        kernels.int8_codes(code, xs, w.data_ptr<int8_t>(), scales.data_ptr<float>(),
                           bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(), rows, k, n,
                           at::get_num_threads());
        return 0;
    });
    y = y.view(with_last(x.sizes(), n));
    torch::jit::drop(*stack, 4);
    torch::jit::push(*stack, std::move(y));
    return true;
}

/* The Python side's hand-over. */
void bind(std::vector<int64_t> addresses, int64_t few_rows) {
    TORCH_CHECK(addresses.size() == 6, "_native_bind takes the addresses of int4_gemv, hadamard_rows, kv_quantize, "
                                       "packed_attention, int8_weight_linear, int8_codes_linear");
    std::lock_guard<std::mutex> lock(guard);
    kernels.gemv = reinterpret_cast<GemvFn>(addresses[0]);
    kernels.hadamard = reinterpret_cast<HadamardFn>(addresses[1]);
    kernels.kv_quantize = reinterpret_cast<KvQuantizeFn>(addresses[2]);
    kernels.attention = reinterpret_cast<AttentionFn>(addresses[3]);
    kernels.int8_linear = reinterpret_cast<Int8LinearFn>(addresses[4]);
    kernels.int8_codes = reinterpret_cast<Int8CodesFn>(addresses[5]);
    kernels.few_rows = few_rows;
}

void unbind() {
    std::lock_guard<std::mutex> lock(guard);
    kernels = Kernels();
    gemv_shapes.clear();  // plans stay: a call in flight may still read one; they are small
}

void allow_gemv(int64_t rows, int64_t in_features, int64_t out_features, std::string policy) {
    std::lock_guard<std::mutex> lock(guard);
    gemv_shapes[{rows, in_features, out_features, policy}] = true;
}

void forget_gemv() {
    std::lock_guard<std::mutex> lock(guard);
    gemv_shapes.clear();
}

void add_plan(int64_t n, int64_t inner, std::vector<int64_t> orders, std::vector<std::optional<at::Tensor>> matrices,
              double scale, bool many_rows) {
    TORCH_CHECK(orders.size() == matrices.size(), "_native_plan: one matrix (or None) per order");
    Plan plan;
    plan.orders = orders;
    plan.scale = static_cast<float>(scale);
    plan.many_rows = many_rows;
    for (const auto &matrix : matrices) {
        if (matrix.has_value()) {
            TORCH_CHECK(matrix->scalar_type() == at::kFloat && matrix->is_contiguous() && matrix->device().is_cpu(),
                        "_native_plan: a factor matrix must be a contiguous float32 CPU tensor");
            plan.keep.push_back(*matrix);
            plan.matrices.push_back(matrix->data_ptr<float>());
        } else {
            plan.matrices.push_back(nullptr);
        }
    }
    std::lock_guard<std::mutex> lock(guard);
    plans.emplace(std::make_pair(n, inner), std::move(plan));  // the first plan of an order stays
}

int64_t native_kernel_ns() { return kernel_ns.load(); }

/* native.c's run_jobs on torch's OpenMP pool (native.c set_job_runner): the C kernels' threads
 * are then the pool's warm ones, not new threads competing with its spinning ones. A job runs
 * on whichever pool thread takes it and computes the same values there. */
int run_on_pool(void *(*run)(void *), void *jobs, size_t size, int64_t threads) {
    std::atomic<int> failed{0};
    at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
        for (int64_t job = first; job < last; job++)
            if (run(static_cast<char *>(jobs) + job * size) != nullptr) failed = 1;
    });
    return failed.load();
}

int64_t pool_runner_address() { return reinterpret_cast<int64_t>(&run_on_pool); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(quarot_fx, m) {
    m.def("_native_bind(int[] addresses, int few_rows) -> ()", &bind);
    m.def("_native_unbind() -> ()", &unbind);
    m.def("_native_allow_gemv(int rows, int in_features, int out_features, str gemm) -> ()", &allow_gemv);
    m.def("_native_forget_gemv() -> ()", &forget_gemv);
    m.def("_native_plan(int n, int inner, int[] orders, Tensor?[] matrices, float scale, bool many_rows) -> ()",
          &add_plan);
    m.def("_native_kernel_ns() -> int", &native_kernel_ns);
    m.def("_native_pool_runner() -> int", &pool_runner_address);
}

TORCH_LIBRARY_IMPL(quarot_fx, CPU, m) {
    m.impl("quantized_linear", torch::CppFunction::makeFromBoxedFunction<&fast_or_python<&linear_fast, linear_twin>>());
    m.impl("hadamard_transform",
           torch::CppFunction::makeFromBoxedFunction<&fast_or_python<&hadamard_fast, hadamard_twin>>());
    m.impl("kv_quantize", torch::CppFunction::makeFromBoxedFunction<&fast_or_python<&kv_quantize_fast, kv_quantize_twin>>());
    m.impl("packed_attention",
           torch::CppFunction::makeFromBoxedFunction<&fast_or_python<&attention_fast, attention_twin>>());
    m.impl("int8_weight_linear",
           torch::CppFunction::makeFromBoxedFunction<&fast_or_python<&int8_linear_fast, int8_linear_twin>>());
    m.impl("int8_dynamic_linear",
           torch::CppFunction::makeFromBoxedFunction<&fast_or_python<&int8_dynamic_fast, int8_dynamic_twin>>());
}

TORCH_LIBRARY_IMPL(quarot_fx, AutogradCPU, m) {
    m.impl("hadamard_transform", torch::CppFunction::makeFromBoxedFunction<&hadamard_transform_autograd>());
}
