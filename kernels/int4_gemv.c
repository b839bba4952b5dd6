/* Exact int4 x int8 GEMV for quarot_fx::quantized_linear at 1..16 rows (decode).
 *
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
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_ROWS 16

void int4_gemv(const int8_t *x, const float *xs, const uint8_t *w, const float *ws, const float *b, float *y,
               int64_t rows, int64_t k, int64_t n_begin, int64_t n_end, int64_t n_total) {
    const int64_t half = k / 2;
    int32_t x_sum[MAX_ROWS];
    for (int64_t m = 0; m < rows; m++) {
        int32_t s = 0;
        for (int64_t j = 0; j < k; j++) s += x[m * k + j];
        x_sum[m] = s;
    }
    for (int64_t n = n_begin; n < n_end; n++) {
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
            y[m * n_total + n] = v;
        }
    }
}
