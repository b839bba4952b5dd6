/* quarot-fx's C kernels for the CPU's decode step (loaded by native.py).
 *
 * int4_gemv: exact int4 x int8 GEMV for quarot_fx::quantized_linear at 1..16 rows.
 * y[m][n] = ((float)acc * ws[n]) * xs[m] (+ b[n]) with acc = sum_k x[m][k] * w[n][k], the float
 * emulation's epilogue in the same order (built with -ffp-contract=off, so no fused multiply-add
 * changes a rounding): the same bits as every other path.
 *
 * x: int8 activation codes [rows, k]; w: int4 codes packed half-split, as pack_linear_weight
 * stores one group: byte j of row n holds w[n][j] (low nibble) and w[n][j + k/2] (high nibble),
 * two's complement; k even. A nibble XOR 8 is its value + 8 in [0, 15], an unsigned byte, which
 * is what AVX2's u8 x s8 multiply-add (vpmaddubsw) takes; sum_k (w+8) x - 8 sum_k x restores the
 * signed sum. Pairs stay far inside int16 (2 * 15 * 128), rows inside int32 while k < 2^20.
 * Without AVX2 the same arithmetic runs in the scalar loop.
 */
#include <math.h>
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_ROWS 16

void int4_gemv(const int8_t *x, const float *xs, const uint8_t *w, const float *ws, const float *b, float *y,
               int64_t rows, int64_t k, int64_t n_out) {
    const int64_t half = k / 2;
    int32_t x_sum[MAX_ROWS];
    for (int64_t m = 0; m < rows; m++) {
        int32_t s = 0;
        for (int64_t j = 0; j < k; j++) s += x[m * k + j];
        x_sum[m] = s;
    }
    for (int64_t n = 0; n < n_out; n++) {
        const uint8_t *row = w + n * half;
        int32_t acc[MAX_ROWS] = {0};
        int64_t j = 0;
#ifdef __AVX2__
        __m256i acc_v[MAX_ROWS];
        for (int64_t m = 0; m < rows; m++) acc_v[m] = _mm256_setzero_si256();
        const __m256i nibble = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(0x08), ones = _mm256_set1_epi16(1);
        for (; j + 32 <= half; j += 32) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(row + j));
            const __m256i lo = _mm256_xor_si256(_mm256_and_si256(v, nibble), eight);
            const __m256i hi = _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), eight);
            for (int64_t m = 0; m < rows; m++) {
                const __m256i x_lo = _mm256_loadu_si256((const __m256i *)(x + m * k + j));
                const __m256i x_hi = _mm256_loadu_si256((const __m256i *)(x + m * k + half + j));
                const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x_lo), _mm256_maddubs_epi16(hi, x_hi));
                acc_v[m] = _mm256_add_epi32(acc_v[m], _mm256_madd_epi16(pairs, ones));
            }
        }
        for (int64_t m = 0; m < rows; m++) {
            int32_t lanes[8];
            _mm256_storeu_si256((__m256i *)lanes, acc_v[m]);
            for (int i = 0; i < 8; i++) acc[m] += lanes[i];
        }
#endif
        for (; j < half; j++) {
            const int32_t lo = (row[j] & 15) ^ 8, hi = (row[j] >> 4) ^ 8;
            for (int64_t m = 0; m < rows; m++) acc[m] += lo * x[m * k + j] + hi * x[m * k + half + j];
        }
        for (int64_t m = 0; m < rows; m++) {
            float v = (float)(acc[m] - 8 * x_sum[m]);
            v = v * ws[n];
            v = v * xs[m];
            if (b) v = v + b[n];
            y[m * n_out + n] = v;
        }
    }
}

/* kv_dequantize: out[r][i] = ((float)code - zero[r]) * scale[r] for the KV cache's codes, in one
 * pass (the torch reference takes several over the whole cache every decode step). Codes of at
 * most 4 bits are packed two per byte (element 2i low, 2i + 1 high), each stored as code - 8 in
 * two's complement, so code = nibble XOR 8; wider codes take one byte each. The float32 subtract
 * is exact (small integers) and the multiply is the reference's, so the bits are the same. */
void kv_dequantize(const uint8_t *codes, const float *scale, const float *zero, float *out, int64_t rows,
                   int64_t length, int64_t row_bytes, int64_t packed) {
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *in = codes + r * row_bytes;
        float *o = out + r * length;
        const float s = scale[r], z = zero[r];
        if (packed) {
            const int64_t pairs = length / 2;
            for (int64_t j = 0; j < pairs; j++) {  /* two outputs per byte: a loop the compiler vectorizes */
                o[2 * j] = ((float)((in[j] & 15) ^ 8) - z) * s;
                o[2 * j + 1] = ((float)((in[j] >> 4) ^ 8) - z) * s;
            }
            if (length & 1) o[length - 1] = ((float)((in[pairs] & 15) ^ 8) - z) * s;
        } else {
            for (int64_t i = 0; i < length; i++) o[i] = ((float)in[i] - z) * s;
        }
    }
}

/* kv_quantize: asymmetric codes of each [length] vector of x, as numerics.quant.asymmetric_codes
 * computes them in float32, op for op (clamped range times clip, scale, rounded zero point,
 * round-half-even codes clamped to [0, 2^bits - 1]), packed as the reference packs them. A decode
 * step quantizes one token per head: the reference's dozen torch calls cost far more than the
 * arithmetic. Returns 1, having written nothing reliable, if a vector holds a NaN or an infinity:
 * the caller then runs the reference, whose non-finite semantics are torch's. */
int kv_quantize(const float *x, uint8_t *codes, float *scale, float *zero, int64_t rows, int64_t length,
                int64_t row_bytes, int64_t bits, float clip, int64_t packed) {
    const float levels = (float)((1 << bits) - 1);
    for (int64_t r = 0; r < rows; r++) {
        const float *v = x + r * length;
        float hi = v[0], lo = v[0];
        for (int64_t i = 0; i < length; i++) {
            if (!isfinite(v[i])) return 1;
            hi = v[i] > hi ? v[i] : hi;
            lo = v[i] < lo ? v[i] : lo;
        }
        hi = (hi < 0.0f ? 0.0f : hi) * clip;
        lo = (lo > 0.0f ? 0.0f : lo) * clip;
        float s = (hi - lo) / levels;
        if (s == 0.0f) s = 1.0f;
        const float z = nearbyintf(-lo / s);
        scale[r] = s;
        zero[r] = z;
        uint8_t *out = codes + r * row_bytes;
        for (int64_t i = 0; i < row_bytes; i++) out[i] = 0;
        for (int64_t i = 0; i < length; i++) {
            float q = nearbyintf(v[i] / s) + z;
            q = q < 0.0f ? 0.0f : (q > levels ? levels : q);
            if (packed)
                out[i >> 1] |= (uint8_t)((((int)q - 8) & 15) << (4 * (i & 1)));
            else
                out[i] = (uint8_t)q;
        }
    }
    return 0;
}

/* hadamard_rows: x [batch, m] times the Kronecker factors of H_m (already scaled), stage by stage
 * as hadamard_transform_cpu runs them: view the row as [m / order, order], multiply by the stage
 * matrix, and write it transposed ([order, m / order]), so after the last stage the axes are back
 * in order. For the few rows of a decode step, where each stage's tiny GEMM costs more in call
 * overhead than in arithmetic. The sums run in k order, a GEMM's may not: the results agree with
 * the GEMMs' to float32 rounding, not bit for bit. */
void hadamard_rows(const float *x, float *out, float *scratch, int64_t batch, int64_t m, int64_t stages,
                   const int64_t *orders, const float *const *matrices) {
    const float *in = x;
    for (int64_t stage = 0; stage < stages; stage++) {
        const int64_t order = orders[stage], groups = m / order;
        const float *h = matrices[stage];
        float *dst = ((stages - stage) & 1) ? out : scratch;  /* the last stage lands in out */
        for (int64_t b = 0; b < batch; b++) {
            for (int64_t j = 0; j < groups; j++) {
                const float *row = in + b * m + j * order;
                float acc[256];
                for (int64_t i = 0; i < order; i++) acc[i] = 0.0f;
                for (int64_t k = 0; k < order; k++) {
                    const float v = row[k];
                    const float *hk = h + k * order;
                    for (int64_t i = 0; i < order; i++) acc[i] += v * hk[i];
                }
                for (int64_t i = 0; i < order; i++) dst[b * m + i * groups + j] = acc[i];
            }
        }
        in = dst;
    }
}
