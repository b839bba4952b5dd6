/* quarot-fx's C kernels for the CPU (loaded by native.py).
 *
 * int4_gemv: exact int4 x int8 GEMV for quarot_fx::quantized_linear at 1..16 rows; int4_gemm: the
 * same sums, register- and cache-blocked, for prefill-sized inputs.
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
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_ROWS 16

/* The instruction set this copy was built for (native.py builds one copy per variant and loads
 * the best the CPU has): the report names it. */
const char *isa_variant(void) {
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return "avx512bf16";
#elif defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return "avx512vnni";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "generic";
#endif
}

/* The epilogue every path shares, in the float emulation's order: ((float)acc * ws) * xs + b. */
static inline float epilogue(int32_t acc, float ws, float xs, const float *b, int64_t n) {
    float v = (float)acc;
    v = v * ws;
    v = v * xs;
    return b ? v + b[n] : v;
}


/* Threads for `units` independent pieces of work that are worth `worth` threads at most. */
#define MAX_THREADS 64
static int64_t thread_count(int64_t threads, int64_t units, int64_t worth) {
    if (threads > units) threads = units;
    if (threads > worth) threads = worth;
    return threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
}

/* Where the threaded kernels' jobs run. Torch's OpenMP threads spin for a while after each of
 * its parallel loops (Inductor's too); threads of our own started meanwhile share the cores with
 * those spinning ones, and a prefill's GEMMs and Hadamards measured 1.5-2x slower for it. So
 * native_ops.cpp, once loaded, hands over a runner that puts the jobs on torch's own pool
 * (at::parallel_for); until then, and without it, the jobs get threads of their own. Each job
 * computes the same values on any thread: the same bits either way. */
typedef int (*job_runner)(void *(*run)(void *), void *jobs, size_t size, int64_t threads);
static job_runner pool_runner = NULL;

void set_job_runner(job_runner runner) { pool_runner = runner; }
void *job_runner_in_use(void) { return (void *)pool_runner; }

/* run(job) for `threads` jobs lying `size` bytes apart: on the pool's runner if one is set, else
 * jobs 1.. on threads of their own, job 0 on the caller's, and any job whose thread cannot start
 * on the caller's too. Returns 1 if any job returned non-NULL (no memory). */
static int run_jobs(void *(*run)(void *), void *jobs, size_t size, int64_t threads) {
    if (pool_runner && threads > 1) return pool_runner(run, jobs, size, threads);
    pthread_t ids[MAX_THREADS];
    char *job = jobs;
    int64_t started = 1;
    for (; started < threads; started++)
        if (pthread_create(&ids[started], NULL, run, job + started * size)) break;
    int failed = run(job) != NULL;
    for (int64_t t = started; t < threads; t++) failed |= run(job + t * size) != NULL;
    for (int64_t t = 1; t < started; t++) {
        void *result;
        pthread_join(ids[t], &result);
        failed |= result != NULL;
    }
    return failed;
}

static void gemv_channels(const int8_t *x, const float *xs, const uint8_t *w, const float *ws, const float *b,
                          float *y, int64_t rows, int64_t k, int64_t n_out, const int32_t *x_sum, int64_t first,
                          int64_t last) {
    const int64_t half = k / 2;
    for (int64_t n = first; n < last; n++) {
        const uint8_t *row = w + n * half;
        int32_t acc[MAX_ROWS] = {0};
        int64_t j = 0;
#ifdef __AVX2__
        __m256i acc_v[MAX_ROWS];
        for (int64_t m = 0; m < rows; m++) acc_v[m] = _mm256_setzero_si256();
        const __m256i nibble = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(0x08);
        for (; j + 32 <= half; j += 32) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(row + j));
            const __m256i lo = _mm256_xor_si256(_mm256_and_si256(v, nibble), eight);
            const __m256i hi = _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), eight);
            for (int64_t m = 0; m < rows; m++) {
                const __m256i x_lo = _mm256_loadu_si256((const __m256i *)(x + m * k + j));
                const __m256i x_hi = _mm256_loadu_si256((const __m256i *)(x + m * k + half + j));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
                /* VNNI: 4 u8 x s8 products added into each int32 lane in one instruction, exactly */
                acc_v[m] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc_v[m], lo, x_lo), hi, x_hi);
#else
                const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x_lo), _mm256_maddubs_epi16(hi, x_hi));
                acc_v[m] = _mm256_add_epi32(acc_v[m], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
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
        for (int64_t m = 0; m < rows; m++) y[m * n_out + n] = epilogue(acc[m] - 8 * x_sum[m], ws[n], xs[m], b, n);
    }
}

#ifdef __AVX2__
/* Rows of weights a GEMV prefetches ahead of the four it reads: the hardware prefetcher does not
 * follow four rows read side by side, and a decode step's weights come from memory, not cache
 * (16 rows: 4.5-12 KB ahead at k = 576-1536; 1.3-1.9x faster GEMVs on an AVX2 EPYC). */
#define GEMV_PREFETCH_ROWS 16

/* The int32 sums of four accumulators' 8 lanes each, as one vector of 4. */
static inline __m128i four_sums(const __m256i acc[4]) {
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

/* One activation row (a decode step), four output channels at a time. XOR 0x88 turns both
 * nibbles of a byte into code + 8 (unsigned) in one instruction. Without VNNI, vpmaddubsw's pair
 * sums add up in int16 for up to 4 steps of 32 bytes (each step adds at most 2 * 2 * 15 * 128 =
 * 7680 per lane, so 4 steps stay within 32767) before one widening vpmaddwd. Integer sums: any
 * order gives the same bits. Returns the first channel not done. */
static int64_t gemv1_quads(const int8_t *x, const float *xs, const uint8_t *w, const float *ws, const float *b,
                           float *y, int64_t k, int32_t x_sum, int64_t first, int64_t last) {
    const int64_t half = k / 2, whole = half / 32 * 32;
    const __m256i nibble = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8((char)0x88);
    int64_t n = first;
    for (; n + 4 <= last; n += 4) {
        __m256i acc[4];
        for (int c = 0; c < 4; c++) acc[c] = _mm256_setzero_si256();
        const int prefetch = n + GEMV_PREFETCH_ROWS + 4 <= last;
        for (int64_t j = 0; j < whole;) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
            const int64_t stop = j + 32;
#else
            __m256i pairs[4];
            for (int c = 0; c < 4; c++) pairs[c] = _mm256_setzero_si256();
            const int64_t stop = j + 4 * 32 < whole ? j + 4 * 32 : whole;
#endif
            for (; j < stop; j += 32) {
                const __m256i x_lo = _mm256_loadu_si256((const __m256i *)(x + j));
                const __m256i x_hi = _mm256_loadu_si256((const __m256i *)(x + half + j));
                for (int c = 0; c < 4; c++) {
                    const uint8_t *row = w + (n + c) * half + j;
                    if (prefetch) _mm_prefetch((const char *)(row + GEMV_PREFETCH_ROWS * half), _MM_HINT_T0);
                    const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)row), flip);
                    const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
                    /* VNNI: 4 u8 x s8 products added into each int32 lane in one instruction, exactly */
                    acc[c] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc[c], lo, x_lo), hi, x_hi);
#else
                    pairs[c] = _mm256_add_epi16(pairs[c], _mm256_add_epi16(_mm256_maddubs_epi16(lo, x_lo),
                                                                           _mm256_maddubs_epi16(hi, x_hi)));
#endif
                }
            }
#if !(defined(__AVX512VNNI__) && defined(__AVX512VL__))
            for (int c = 0; c < 4; c++) acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(pairs[c], _mm256_set1_epi16(1)));
#endif
        }
        int32_t sums[4];
        _mm_storeu_si128((__m128i *)sums, four_sums(acc));
        for (int c = 0; c < 4; c++) {
            const uint8_t *row = w + (n + c) * half;
            int32_t acc_c = sums[c];
            for (int64_t j = whole; j < half; j++)
                acc_c += ((row[j] & 15) ^ 8) * x[j] + ((row[j] >> 4) ^ 8) * x[half + j];
            y[n + c] = epilogue(acc_c - 8 * x_sum, ws[n + c], xs[0], b, n + c);
        }
    }
    return n;
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* Rows of weights the 512-bit GEMV prefetches ahead of the one it reads. */
#define GEMV512_PREFETCH_ROWS 12

/* One activation row, one output channel at a time in 512-bit registers (64 weight bytes, 128
 * codes, per step; the row's last bytes through a mask). On a Zen 4 (AVX512-VNNI) this read a
 * decode step's int4 weights 1.2-1.3x faster than gemv1_quads' four channels side by side: one
 * sequential stream per thread, which the hardware prefetcher follows, and a third of the
 * instructions per byte. Integer sums and the same epilogue: the same bits. */
static void gemv1_rows512(const int8_t *x, const float *xs, const uint8_t *w, const float *ws, const float *b,
                          float *y, int64_t k, int32_t x_sum, int64_t first, int64_t last) {
    const int64_t half = k / 2;
    const __m512i nibble = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x88);
    for (int64_t n = first; n < last; n++) {
        const uint8_t *row = w + n * half;
        const int prefetch = n + GEMV512_PREFETCH_ROWS < last;
        __m512i acc = _mm512_setzero_si512();
        for (int64_t j = 0; j < half; j += 64) {
            const __mmask64 live = half - j >= 64 ? ~0ULL : (1ULL << (half - j)) - 1;
            if (prefetch) _mm_prefetch((const char *)(row + GEMV512_PREFETCH_ROWS * half + j), _MM_HINT_T0);
            const __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(live, row + j), flip);
            acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(v, nibble), _mm512_maskz_loadu_epi8(live, x + j));
            acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble),
                                      _mm512_maskz_loadu_epi8(live, x + half + j));
        }
        /* masked-off bytes load as 0, and 0 XOR 0x88 masked to nibbles is 8: times x = 0, nothing */
        y[n] = epilogue(_mm512_reduce_add_epi32(acc) - 8 * x_sum, ws[n], xs[0], b, n);
    }
}
#endif

/* One thread: a second one (tried) did not pay for its start at decode sizes. */
void int4_gemv(const int8_t *x, const float *xs, const uint8_t *w, const float *ws, const float *b, float *y,
               int64_t rows, int64_t k, int64_t n_out) {
    int32_t x_sum[MAX_ROWS];
    for (int64_t m = 0; m < rows; m++) {
        int32_t s = 0;
        for (int64_t j = 0; j < k; j++) s += x[m * k + j];
        x_sum[m] = s;
    }
    int64_t first = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (rows == 1 && k % 2 == 0) {
        gemv1_rows512(x, xs, w, ws, b, y, k, x_sum[0], 0, n_out);
        return;
    }
#endif
#ifdef __AVX2__
    if (rows == 1) first = gemv1_quads(x, xs, w, ws, b, y, k, x_sum[0], 0, n_out);
#endif
    gemv_channels(x, xs, w, ws, b, y, rows, k, n_out, x_sum, first, n_out);
}

/* int4_gemm: y [m, n] for the many rows of a prefill, the same sums and epilogue as int4_gemv.
 * The weight is first unpacked into panels of GEMM_NR output columns, each [k/4][GEMM_NR][4]
 * bytes of w + 8 (columns past n are 0, so they add nothing), the layout in which one 32-byte
 * load holds 8 columns x 4 inputs; a tile of GEMM_MR rows broadcasts each row's 4 codes and
 * multiplies them with vpmaddubsw (u8 x s8 -> pairs summed in int16). Those int16 sums are added
 * for as many steps as provably fit in int16 (|pair| <= 2 * 15 * max|x|, max|x| measured on the
 * input), then widened into int32 with vpmaddwd: two byte-multiply instructions per 32
 * multiply-adds, against four fp32 FMAs for the same work. Rows are blocked so a block of x stays
 * in L2 while every panel of a thread passes over it; threads split the panels (each unpacks only
 * its own). Needs k % 4 == 0 and AVX2 (native.py asks gemm_available()). */
#define GEMM_NR 16
#define GEMM_MR 4
#define GEMM_BLOCK_BYTES (256 * 1024)
/* Starting and joining a thread costs tens of microseconds, about the time of this many
 * multiply-adds: smaller products run on fewer threads. */
#define GEMM_WORK_PER_THREAD (1LL << 24)

int gemm_available(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX2__
typedef struct {
    const int8_t *x; const float *xs; const uint8_t *w; const float *ws; const float *b; float *y;
    const int32_t *x_sum; int64_t m, k, n, panel_begin, panel_end, steps;
} gemm_job;

static void pack_panel(const uint8_t *w, uint8_t *panel, int64_t k, int64_t n, int64_t first) {
    const int64_t half = k / 2;
    memset(panel, 0, (size_t)k * GEMM_NR);
    const int64_t cols = n - first < GEMM_NR ? n - first : GEMM_NR;
    if (half % 4 == 0) {  /* four bytes of a row are one input quad of each half: move them as words */
        uint32_t *out = (uint32_t *)panel;
        for (int64_t q = 0; q < half / 4; q++)
            for (int64_t c = 0; c < cols; c++) {
                uint32_t v;
                memcpy(&v, w + (first + c) * half + 4 * q, 4);
                out[q * GEMM_NR + c] = (v & 0x0F0F0F0Fu) ^ 0x08080808u;
                out[(q + half / 4) * GEMM_NR + c] = ((v >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u;
            }
        return;
    }
    for (int64_t c = 0; c < cols; c++) {
        const uint8_t *row = w + (first + c) * half;
        for (int64_t j = 0; j < half; j++) {
            panel[(j >> 2) * 4 * GEMM_NR + c * 4 + (j & 3)] = (row[j] & 15) ^ 8;
            panel[((j + half) >> 2) * 4 * GEMM_NR + c * 4 + ((j + half) & 3)] = (row[j] >> 4) ^ 8;
        }
    }
}

/* The epilogue for a whole panel row, 8 lanes at a time, the same operations as epilogue() (no
 * fused multiply-add). */
static void epilogue_8(const int32_t *acc, int32_t x_sum, const float *ws, float xs, const float *b, float *out) {
    const __m256i offset = _mm256_set1_epi32(8 * x_sum);
    const __m256 row_scale = _mm256_set1_ps(xs);
    for (int64_t c = 0; c < GEMM_NR; c += 8) {
        __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_loadu_si256((const __m256i *)(acc + c)), offset));
        v = _mm256_mul_ps(_mm256_mul_ps(v, _mm256_loadu_ps(ws + c)), row_scale);
        if (b) v = _mm256_add_ps(v, _mm256_loadu_ps(b + c));
        _mm256_storeu_ps(out + c, v);
    }
}

/* One GEMM_MR x GEMM_NR tile over all of k; x holds GEMM_MR rows of stride k. The int16 sums
 * stay in registers for `steps` quads and are then widened into `out`: with the int32 sums in
 * memory the loop holds 8 accumulators, 2 weight vectors and a broadcast, all in the 16 ymm
 * registers. GCC's partial-redundancy elimination hoists the four broadcasts out of order and
 * spills an accumulator (measured: 25-40% slower), so it is off for this function. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
/* AVX512-VNNI: one 512-bit vpdpbusd adds a row's 4 u8 x s8 products for all 16 columns straight
 * into int32 lanes, so a tile's sums stay in 4 registers over all of k (no int16 steps to widen):
 * the same exact sums in a quarter of the instructions (1.3-1.5x the 256-bit AVX2 tile on an
 * AVX512-VNNI EPYC, one thread). */
static inline void vnni_tile(const int8_t *x, int64_t k, const uint8_t *panel, __m512i wide[GEMM_MR]) {
    for (int i = 0; i < GEMM_MR; i++) wide[i] = _mm512_setzero_si512();
    for (int64_t q = 0; q < k / 4; q++) {
        const __m512i w = _mm512_loadu_si512((const void *)(panel + q * 4 * GEMM_NR));
        for (int i = 0; i < GEMM_MR; i++) {
            int32_t four;
            memcpy(&four, x + i * k + 4 * q, 4);
            wide[i] = _mm512_dpbusd_epi32(wide[i], w, _mm512_set1_epi32(four));
        }
    }
}
#endif

#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-pre")))
#endif
static void gemm_tile(const int8_t *x, int64_t k, const uint8_t *panel, int64_t steps, int32_t out[GEMM_MR][GEMM_NR]) {
    const int64_t quads = k / 4;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    (void)steps; (void)quads;
    __m512i wide[GEMM_MR];
    vnni_tile(x, k, panel, wide);
    for (int i = 0; i < GEMM_MR; i++) _mm512_storeu_si512((void *)out[i], wide[i]);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    memset(out, 0, sizeof(int32_t) * GEMM_MR * GEMM_NR);
    for (int64_t q = 0; q < quads;) {
        const int64_t end = q + steps < quads ? q + steps : quads;
        __m256i narrow[GEMM_MR][2];
        for (int i = 0; i < GEMM_MR; i++) narrow[i][0] = narrow[i][1] = _mm256_setzero_si256();
        for (; q < end; q++) {
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(panel + q * 4 * GEMM_NR));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(panel + q * 4 * GEMM_NR + 32));
            for (int i = 0; i < GEMM_MR; i++) {
                int32_t four;
                memcpy(&four, x + i * k + 4 * q, 4);
                const __m256i a = _mm256_set1_epi32(four);
                narrow[i][0] = _mm256_add_epi16(narrow[i][0], _mm256_maddubs_epi16(w0, a));
                narrow[i][1] = _mm256_add_epi16(narrow[i][1], _mm256_maddubs_epi16(w1, a));
            }
        }
        for (int i = 0; i < GEMM_MR; i++)
            for (int h = 0; h < 2; h++) {
                __m256i *o = (__m256i *)(out[i] + 8 * h);
                _mm256_storeu_si256(o, _mm256_add_epi32(_mm256_loadu_si256(o), _mm256_madd_epi16(narrow[i][h], ones)));
            }
    }
#endif
}

static void *gemm_run(void *arg) {
    const gemm_job *job = arg;
    const int64_t k = job->k, n = job->n, panels = job->panel_end - job->panel_begin;
    uint8_t *packed = malloc((size_t)(panels * k * GEMM_NR));
    int8_t *tail = calloc((size_t)(GEMM_MR * k), 1);  /* the last rows, zero-padded to a whole tile */
    if (!packed || !tail) { free(packed); free(tail); return (void *)1; }
    for (int64_t p = 0; p < panels; p++) pack_panel(job->w, packed + p * k * GEMM_NR, k, n, (job->panel_begin + p) * GEMM_NR);
    int64_t block = GEMM_BLOCK_BYTES / k / GEMM_MR * GEMM_MR;
    if (block < GEMM_MR) block = GEMM_MR;
    int32_t acc[GEMM_MR][GEMM_NR];
    for (int64_t r0 = 0; r0 < job->m; r0 += block) {
        const int64_t r1 = r0 + block < job->m ? r0 + block : job->m;
        for (int64_t p = 0; p < panels; p++) {
            const int64_t first = (job->panel_begin + p) * GEMM_NR;
            const int64_t cols = n - first < GEMM_NR ? n - first : GEMM_NR;
            for (int64_t r = r0; r < r1; r += GEMM_MR) {
                const int64_t rows = r1 - r < GEMM_MR ? r1 - r : GEMM_MR;
                const int8_t *x = job->x + r * k;
                if (rows < GEMM_MR) { memcpy(tail, x, (size_t)(rows * k)); x = tail; }
                gemm_tile(x, k, packed + p * k * GEMM_NR, job->steps, acc);
                for (int64_t i = 0; i < rows; i++) {
                    float *out = job->y + (r + i) * n + first;
                    if (cols == GEMM_NR) {
                        epilogue_8(acc[i], job->x_sum[r + i], job->ws + first, job->xs[r + i],
                                   job->b ? job->b + first : NULL, out);
                        continue;
                    }
                    for (int64_t c = 0; c < cols; c++)
                        out[c] = epilogue(acc[i][c] - 8 * job->x_sum[r + i], job->ws[first + c], job->xs[r + i], job->b, first + c);
                }
            }
        }
    }
    free(packed);
    free(tail);
    return NULL;
}
#endif

/* Returns 0, or 1 if memory or a thread could not be had (nothing reliable written then). */
int int4_gemm(const int8_t *x, const float *xs, const uint8_t *w, const float *ws, const float *b, float *y,
              int64_t m, int64_t k, int64_t n, int64_t threads) {
#ifdef __AVX2__
    int32_t *x_sum = malloc((size_t)m * sizeof(int32_t));
    if (!x_sum) return 1;
    int32_t largest = 0;
    for (int64_t r = 0; r < m; r++) {
        int32_t s = 0, top = 0;
        for (int64_t j = 0; j < k; j++) {
            const int32_t v = x[r * k + j];
            s += v;
            top = top > abs(v) ? top : abs(v);
        }
        x_sum[r] = s;
        largest = largest > top ? largest : top;
    }
    const int64_t panels = (n + GEMM_NR - 1) / GEMM_NR;
    threads = thread_count(threads, panels, 1 + m * k * n / GEMM_WORK_PER_THREAD);
    gemm_job jobs[MAX_THREADS];
    for (int64_t t = 0; t < threads; t++) {
        jobs[t] = (gemm_job){x, xs, w, ws, b, y, x_sum, m, k, n, panels * t / threads, panels * (t + 1) / threads,
                             largest ? 32767 / (2 * 15 * largest) : k};
    }
    const int failed = run_jobs(gemm_run, jobs, sizeof jobs[0], threads);
    free(x_sum);
    return failed;
#else
    (void)x; (void)xs; (void)w; (void)ws; (void)b; (void)y; (void)m; (void)k; (void)n; (void)threads;
    return 1;
#endif
}

/* int32_epilogue: y = ((float)acc * ws[n]) * xs[m] (+ b[n]) over the exact int32 sums of another
 * GEMM (torch._int_mm's), in place: `sums` holds the int32 sums [m, n] on entry and the float32
 * outputs on return, the same 4 bytes per element. One pass over the rows where torch's
 * conversion, two scalings and the bias took four (and a buffer), with epilogue()'s operations in
 * its order: the same bits. */
typedef struct { void *sums; const float *xs, *ws, *b; int64_t first, last, n; } epilogue_job;

static void *epilogue_run(void *arg) {
    const epilogue_job *job = arg;
    const int64_t n = job->n;
    for (int64_t r = job->first; r < job->last; r++) {
        char *row = (char *)job->sums + r * n * 4;
        int64_t c = 0;
#ifdef __AVX2__
        for (; c + GEMM_NR <= n; c += GEMM_NR)
            epilogue_8((const int32_t *)(row + 4 * c), 0, job->ws + c, job->xs[r], job->b ? job->b + c : NULL,
                       (float *)(row + 4 * c));
#endif
        for (; c < n; c++) {
            int32_t acc;
            memcpy(&acc, row + 4 * c, 4);
            const float v = epilogue(acc, job->ws[c], job->xs[r], job->b, c);
            memcpy(row + 4 * c, &v, 4);
        }
    }
    return NULL;
}

int int32_epilogue(void *sums, const float *xs, const float *ws, const float *b, int64_t m, int64_t n,
                   int64_t threads) {
    threads = thread_count(threads, m, 1 + m * n / (1 << 16));
    epilogue_job jobs[MAX_THREADS];
    for (int64_t t = 0; t < threads; t++)
        jobs[t] = (epilogue_job){sums, xs, ws, b, m * t / threads, m * (t + 1) / threads, n};
    return run_jobs(epilogue_run, jobs, sizeof jobs[0], threads);
}

/* kv_dequantize: out[r][i] = ((float)code - zero[r]) * scale[r] for the KV cache's codes, in one
 * pass (the torch reference takes several over the whole cache every decode step). Codes of at
 * most 4 bits are packed two per byte (element 2i low, 2i + 1 high), each stored as code - 8 in
 * two's complement, so code = nibble XOR 8; wider codes take one byte each. The float32 subtract
 * is exact (small integers) and the multiply is the reference's, so the bits are the same. */
#ifdef __AVX2__
/* The 16 nibbles of 8 packed bytes in element order (byte m's low nibble, then its high one):
 * the stored 4-bit codes, each in a byte (the KV cache's, the int8 attention's values). */
static inline __m128i nibbles(__m128i bytes) {
    const __m128i low_nibbles = _mm_set1_epi8(15);
    return _mm_unpacklo_epi8(_mm_and_si128(bytes, low_nibbles), _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibbles));
}
#endif

static void dequantize_row(const uint8_t *in, float s, float z, float *o, int64_t length, int64_t packed) {
    if (packed) {
        const int64_t pairs = length / 2;
        int64_t j = 0;
#ifdef __AVX2__
        /* 16 codes from 8 bytes: the low and high nibbles interleaved back into element order, then
         * the scalar loop's (code - z) * s on 8 lanes: the same values. */
        const __m128i eight = _mm_set1_epi8(8);
        const __m256 zero = _mm256_set1_ps(z), step = _mm256_set1_ps(s);
        for (; j + 8 <= pairs; j += 8) {
            const __m128i codes = _mm_xor_si128(nibbles(_mm_loadl_epi64((const __m128i *)(in + j))), eight);
            const __m256 first = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
            const __m256 second = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)));
            _mm256_storeu_ps(o + 2 * j, _mm256_mul_ps(_mm256_sub_ps(first, zero), step));
            _mm256_storeu_ps(o + 2 * j + 8, _mm256_mul_ps(_mm256_sub_ps(second, zero), step));
        }
#endif
        for (; j < pairs; j++) {  /* two outputs per byte: a loop the compiler vectorizes */
            o[2 * j] = ((float)((in[j] & 15) ^ 8) - z) * s;
            o[2 * j + 1] = ((float)((in[j] >> 4) ^ 8) - z) * s;
        }
        if (length & 1) o[length - 1] = ((float)((in[pairs] & 15) ^ 8) - z) * s;
    } else {
        for (int64_t i = 0; i < length; i++) o[i] = ((float)in[i] - z) * s;
    }
}

void kv_dequantize(const uint8_t *codes, const float *scale, const float *zero, float *out, int64_t rows,
                   int64_t length, int64_t row_bytes, int64_t packed) {
    for (int64_t r = 0; r < rows; r++) dequantize_row(codes + r * row_bytes, scale[r], zero[r], out + r * length, length, packed);
}

/* packed_attention: softmax(q k^T * scale) v for a few query rows (a decode step) straight from the
 * packed cache, which is dequantized one block of ATTENTION_BLOCK tokens at a time (as kv_dequantize
 * would, the same values) and consumed with an online softmax, so the layer's whole cache never
 * exists in float. q [batch, q_heads, rows, d]; codes [batch, kv_heads, tokens, row_bytes] with one
 * scale and zero per vector; query head h reads kv head h / (q_heads / kv_heads), as SDPA's
 * enable_gqa. causal: query row r sees keys 0..r (SDPA's is_causal, top-left). mask (or NULL): an
 * additive float mask read at mask[b*mb + qh*mh + r*mr + t] (a stride 0 broadcasts), as SDPA adds
 * attn_mask; -inf excludes a key, and a block no query sees is neither dequantized nor read (a static
 * cache's unwritten tail). A query that sees no key gets zeros; one with a NaN score gets NaNs, as
 * from SDPA. Sums run in another order than SDPA's and, with AVX2, the weights' exponentials come
 * from a polynomial within a few ulp of expf, so results agree to float rounding. Work units are
 * spans of ATTENTION_SPAN tokens of one (batch, kv head), on up to `threads` threads; the same bits
 * for any thread count. Returns 1 on no memory. */
#define ATTENTION_BLOCK 64

static float dot(const float *a, const float *b, int64_t d) {
    int64_t i = 0;
    float total = 0.0f;
#ifdef __AVX2__
    __m256 sum = _mm256_setzero_ps();
    for (; i + 8 <= d; i += 8) sum = _mm256_add_ps(sum, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    float lanes[8];
    _mm256_storeu_ps(lanes, sum);
    for (int j = 0; j < 8; j++) total += lanes[j];
#endif
    for (; i < d; i++) total += a[i] * b[i];
    return total;
}

#ifdef __AVX2__
/* Eight sums of 8 lanes reduced together by a tree of horizontal adds: one vector of eight scores,
 * not eight serial lane sums. */
static inline void reduce_x8(const __m256 s[8], float out[8]) {
    const __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
    const __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20),
                                        _mm256_permute2f128_ps(low, high, 0x31)));
}

/* dot() of one query with eight keys: eight sums of 8 lanes with fused multiply-adds, reduced by
 * reduce_x8. */
static void dot_x8(const float *a, const float *keys, int64_t d, float out[8]) {
    __m256 s[8];
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++) s[c] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
        const __m256 q = _mm256_loadu_ps(a + i);
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) s[c] = _mm256_fmadd_ps(q, _mm256_loadu_ps(keys + c * d + i), s[c]);
    }
    reduce_x8(s, out);
    for (; i < d; i++)
        for (int c = 0; c < 8; c++) out[c] += a[i] * keys[c * d + i];
}

/* expf on 8 lanes of x <= 0 (scores minus their maximum), within a few ulp of libm: x = n ln2 + r
 * with |r| <= ln2 / 2, a degree-6 polynomial for e^r, 2^n from the exponent bits. Lanes below
 * -87.3 (e^x under the smallest normal float, -inf included) give 0, NaN gives NaN. The constants
 * are shared with exp_lanes16 (the same operations on 16 lanes). */
#define EXP_FLOOR -87.33654f
#define EXP_LOG2E 1.44269504f
#define EXP_LN2_HIGH 0.693359375f  /* ln2 in two parts: n * high is exact */
#define EXP_LN2_LOW -2.12194440e-4f
#define EXP_P5 1.3981999507e-3f
#define EXP_P4 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P2 1.6666665459e-1f
#define EXP_P1 5.0000001201e-1f
static inline __m256 exp_lanes(__m256 x) {
    const __m256 floor_x = _mm256_set1_ps(EXP_FLOOR);
    const __m256 below = _mm256_cmp_ps(x, floor_x, _CMP_LT_OQ);
    x = _mm256_max_ps(floor_x, x);  /* this operand order passes a NaN on, as expf does */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HIGH), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LOW), r);
    __m256 p = _mm256_set1_ps(EXP_P5);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P1));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(below, _mm256_mul_ps(p, _mm256_castsi256_ps(power)));
}
#endif

/* a[i] += weights[j] * values[j][i] for j = 0..count-1 in that order, as one loop over j would
 * add them (a multiply, then an add: the same bits), with a chunk of a held in registers while
 * the tokens stream past instead of a load and a store per token. The vector loops, for vectors
 * of `lanes` floats: four of a at a time, then one; the caller's i continues past them. */
#define ADD_WEIGHTED_VECTORS(vec, lanes, load, store, set1, add, mul)                                  \
    for (; i + 4 * (lanes) <= d; i += 4 * (lanes)) {                                                  \
        vec a0 = load(a + i), a1 = load(a + i + (lanes)), a2 = load(a + i + 2 * (lanes)),             \
            a3 = load(a + i + 3 * (lanes));                                                           \
        for (int64_t j = 0; j < count; j++) {                                                         \
            const vec w = set1(weights[j]);                                                           \
            const float *v = values + j * d + i;                                                      \
            a0 = add(a0, mul(w, load(v)));                                                            \
            a1 = add(a1, mul(w, load(v + (lanes))));                                                  \
            a2 = add(a2, mul(w, load(v + 2 * (lanes))));                                              \
            a3 = add(a3, mul(w, load(v + 3 * (lanes))));                                              \
        }                                                                                             \
        store(a + i, a0); store(a + i + (lanes), a1);                                                 \
        store(a + i + 2 * (lanes), a2); store(a + i + 3 * (lanes), a3);                               \
    }                                                                                                 \
    for (; i + (lanes) <= d; i += (lanes)) {                                                          \
        vec a0 = load(a + i);                                                                         \
        for (int64_t j = 0; j < count; j++) a0 = add(a0, mul(set1(weights[j]), load(values + j * d + i))); \
        store(a + i, a0);                                                                             \
    }

static void add_weighted(float *a, const float *weights, const float *values, int64_t count, int64_t d) {
    int64_t i = 0;
#ifdef __AVX2__
    ADD_WEIGHTED_VECTORS(__m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_add_ps, _mm256_mul_ps)
#endif
    for (; i < d; i++) {
        float sum = a[i];
        for (int64_t j = 0; j < count; j++) sum += weights[j] * values[j * d + i];
        a[i] = sum;
    }
}

/* The first step of folding one block of a query's scores into its online softmax: score[0..seen)
 * (with room for 8 floats after them) become the keys' weights, and the running maximum *top, the
 * running sum of weights *total and the output row a are rescaled when the maximum grows. Returns
 * 0, having formed no weights, where the block adds nothing: every key masked (-inf), or a NaN
 * score (which makes *total NaN: SDPA's row is NaN then). */
static int block_weights(float *score, int64_t seen, float *top, float *total, float *a, int64_t d, float *block_max) {
    float block_top = -INFINITY;
    int64_t j0 = 0;
    int nan_seen = 0;
#ifdef __AVX2__
    __m256 most = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
    for (; j0 + 8 <= seen; j0 += 8) {
        const __m256 v = _mm256_loadu_ps(score + j0);
        most = _mm256_max_ps(most, v);
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, most);
    for (int c = 0; c < 8; c++) block_top = lanes[c] > block_top ? lanes[c] : block_top;
    nan_seen = _mm256_movemask_ps(unordered) != 0;
#endif
    for (int64_t j = j0; j < seen; j++) {
        block_top = score[j] > block_top ? score[j] : block_top;
        nan_seen |= isnan(score[j]) != 0;
    }
    if (nan_seen) *total = NAN;
    if (isnan(*total) || block_top == -INFINITY) return 0;
    if (block_max) *block_max = block_top;
    const float new_top = block_top > *top ? block_top : *top;
    if (*top != -INFINITY && new_top != *top) {
        const float shrink = expf(*top - new_top);
        *total *= shrink;
        for (int64_t i = 0; i < d; i++) a[i] *= shrink;
    }
    *top = new_top;
    j0 = 0;  /* score[j] becomes the key's weight */
#ifdef __AVX2__
    for (int64_t j = seen; j < (seen + 7) / 8 * 8; j++) score[j] = -INFINITY;  /* weight 0 */
    __m256 sum = _mm256_setzero_ps();
    for (; j0 < seen; j0 += 8) {
        const __m256 w = exp_lanes(_mm256_sub_ps(_mm256_loadu_ps(score + j0), _mm256_set1_ps(new_top)));
        _mm256_storeu_ps(score + j0, w);
        sum = _mm256_add_ps(sum, w);
    }
    _mm256_storeu_ps(lanes, sum);
    for (int c = 0; c < 8; c++) *total += lanes[c];
#endif
    for (int64_t j = j0; j < seen; j++) {
        score[j] = expf(score[j] - new_top);
        *total += score[j];
    }
    return 1;
}

/* Folds one block of a query's scores into its online softmax (block_weights), then the block's
 * values weighted into its output row a. */
static void fold_block(float *score, int64_t seen, float *top, float *total, float *a, const float *values, int64_t d) {
    if (block_weights(score, seen, top, total, a, d, NULL)) add_weighted(a, score, values, seen, d);
}

/* A query's output row: the weighted sum over the sum of weights (zeros where no key was seen,
 * NaNs where a score was NaN). */
static void finish_row(float *o, const float *a, float total, int64_t d) {
    for (int64_t i = 0; i < d; i++) o[i] = isnan(total) ? NAN : total > 0.0f ? a[i] / total : 0.0f;
}

/* Whether any query row of kv head group [qh0, qh0 + groups) sees a key of tokens t0..t0+count-1. */
static int block_seen(const float *mask, int64_t offset, int64_t qh0, int64_t groups, int64_t rows, int64_t mh,
                      int64_t mr, int64_t t0, int64_t count) {
    for (int64_t g = 0; g < groups; g++)
        for (int64_t r = 0; r < rows; r++) {
            const float *m = mask + offset + (qh0 + g) * mh + r * mr + t0;
            for (int64_t j = 0; j < count; j++)
                if (m[j] != -INFINITY) return 1;
        }
    return 0;
}

/* Tokens per work unit of packed_attention: a (batch, kv head) pair's tokens are cut into spans of
 * this many, each folded on whichever thread takes it, then merged in span order. A fixed plan (not
 * one per thread count): the same bits on any number of threads. Why: a decode step has few kv
 * heads (SmolLM2-135M: 3), and one unit per head left one of 2 threads doing twice the other's work. */
#define ATTENTION_SPAN (2 * ATTENTION_BLOCK)

typedef struct {
    const float *q; const uint8_t *k_codes; const float *k_scale, *k_zero; const uint8_t *v_codes;
    const float *v_scale, *v_zero; const float *mask;
    int64_t q_heads, kv_heads, rows, tokens, d, row_bytes, packed, causal, mb, mh, mr, spans, units, *next;
    float scale;
    float *state;  /* per unit: top and total of each query state, then its d sums */
} attention_job;

/* One unit: kv head h of batch b over tokens [first, last), into its online-softmax state. */
static void attention_span(const attention_job *job, int64_t b, int64_t h, int64_t first, int64_t last, float *keys,
                           float *values, float *score, float *state) {
    const int64_t d = job->d, groups = job->q_heads / job->kv_heads, rows = job->rows, states = groups * rows;
    const int64_t kv = (b * job->kv_heads + h) * job->tokens, row_bytes = job->row_bytes;
    float *top = state, *total = state + states, *acc = state + 2 * states;
    const float *mask = job->mask;
    for (int64_t s = 0; s < states; s++) { top[s] = -INFINITY; total[s] = 0.0f; }
    memset(acc, 0, sizeof(float) * states * d);
    for (int64_t t0 = first; t0 < last; t0 += ATTENTION_BLOCK) {
        const int64_t count = last - t0 < ATTENTION_BLOCK ? last - t0 : ATTENTION_BLOCK;
        if (mask && !block_seen(mask, b * job->mb, h * groups, groups, rows, job->mh, job->mr, t0, count)) continue;
        for (int64_t j = 0; j < count; j++) {
            const int64_t t = kv + t0 + j;
            dequantize_row(job->k_codes + t * row_bytes, job->k_scale[t], job->k_zero[t], keys + j * d, d, job->packed);
            dequantize_row(job->v_codes + t * row_bytes, job->v_scale[t], job->v_zero[t], values + j * d, d, job->packed);
        }
        for (int64_t s = 0; s < states; s++) {
            const int64_t g = s / rows, r = s % rows;
            const float *query = job->q + ((b * job->q_heads + h * groups + g) * rows + r) * d;
            const int64_t seen = job->causal ? (r + 1 - t0 < count ? r + 1 - t0 : count) : count;
            if (seen <= 0 || isnan(total[s])) continue;  /* NaN: a NaN score was seen, SDPA's row is NaN */
            const float *added = mask ? mask + b * job->mb + (h * groups + g) * job->mh + r * job->mr + t0 : NULL;
            int64_t j = 0;
#ifdef __AVX2__
            for (; j + 8 <= seen; j += 8) dot_x8(query, keys + j * d, d, score + j);
#endif
            for (; j < seen; j++) score[j] = dot(query, keys + j * d, d);
            for (j = 0; j < seen; j++) score[j] = score[j] * job->scale + (added ? added[j] : 0.0f);
            fold_block(score, seen, top + s, total + s, acc + s * d, values, d);
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__)
/* A decode step's attention_span on AVX512 (one query row per query head, 4-bit packed codes, d a
 * multiple of 16, at most ATTENTION_FAST_STATES query heads per kv head): the keys are never
 * stored as floats. Eight keys at a time are dequantized in registers as four pairs (key 2p in
 * the low half of a 512-bit register, 2p + 1 in the high half, chunk by chunk of 8 elements) and
 * multiplied with every query head of the group at once, each half doing dot_x8's lane arithmetic
 * for its key, reduced by dot_x8's tree. The values are dequantized once per block, 16 elements a
 * register, and added by add_weighted's arithmetic in 16 lanes. Every element gets the operations
 * of the 8-lane path in the same order: the same bits, and the same values as dequantize_row. */
#define ATTENTION_FAST_STATES 4

static inline __m512 pair_scale(const float *v, int64_t first, int64_t second) {
    return _mm512_insertf32x8(_mm512_set1_ps(v[first]), _mm256_set1_ps(v[second]), 1);
}

/* 16 codes from 8 bytes, element order (as dequantize_row), as floats (code - zero) * step */
static inline __m512 codes16(__m128i bytes, __m512 zero, __m512 step) {
    const __m128i codes = _mm_xor_si128(nibbles(bytes), _mm_set1_epi8(8));
    return _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes)), zero), step);
}

static inline __m128i two_words(const uint8_t *a, const uint8_t *b) {
    int32_t x, y;
    memcpy(&x, a, 4); memcpy(&y, b, 4);
    return _mm_insert_epi32(_mm_cvtsi32_si128(x), y, 1);
}

/* scores of `states` queries (q, q + d, ...) with the 8 keys from token t: out[st * stride + c] */
static inline __attribute__((always_inline)) void scores_x8(const float *q, int states, const attention_job *job,
                                                            int64_t t, float *out, int64_t stride) {
    const int64_t d = job->d, rb = job->row_bytes;
    const uint8_t *k = job->k_codes + t * rb;
    __m512 s[ATTENTION_FAST_STATES][4], zero[4], step[4];
    for (int p = 0; p < 4; p++) {
        zero[p] = pair_scale(job->k_zero, t + 2 * p, t + 2 * p + 1);
        step[p] = pair_scale(job->k_scale, t + 2 * p, t + 2 * p + 1);
        for (int st = 0; st < states; st++) s[st][p] = _mm512_setzero_ps();
    }
    for (int64_t i = 0; i < d; i += 8) {
        __m512 key[4];
        for (int p = 0; p < 4; p++)
            key[p] = codes16(two_words(k + 2 * p * rb + i / 2, k + (2 * p + 1) * rb + i / 2), zero[p], step[p]);
        for (int st = 0; st < states; st++) {
            const __m512 query = _mm512_broadcast_f32x8(_mm256_loadu_ps(q + st * d + i));
            for (int p = 0; p < 4; p++) s[st][p] = _mm512_fmadd_ps(query, key[p], s[st][p]);
        }
    }
    for (int st = 0; st < states; st++) {
        __m256 h[8];
        for (int p = 0; p < 4; p++) {
            h[2 * p] = _mm512_castps512_ps256(s[st][p]);
            h[2 * p + 1] = _mm512_extractf32x8_ps(s[st][p], 1);
        }
        reduce_x8(h, out + st * stride);
    }
}

static void scores_block(const float *q, int states, const attention_job *job, int64_t t, int64_t groups8,
                         float *out, int64_t stride) {
    switch (states) {  /* constant state counts: the accumulators stay in registers */
    case 1: for (int64_t g = 0; g < groups8; g++) scores_x8(q, 1, job, t + 8 * g, out + 8 * g, stride); break;
    case 2: for (int64_t g = 0; g < groups8; g++) scores_x8(q, 2, job, t + 8 * g, out + 8 * g, stride); break;
    case 3: for (int64_t g = 0; g < groups8; g++) scores_x8(q, 3, job, t + 8 * g, out + 8 * g, stride); break;
    default: for (int64_t g = 0; g < groups8; g++) scores_x8(q, 4, job, t + 8 * g, out + 8 * g, stride); break;
    }
}

/* add_weighted in 16 lanes (d a multiple of 16): per element the same multiply, then add, in j order */
static void add_weighted16(float *a, const float *weights, const float *values, int64_t count, int64_t d) {
    int64_t i = 0;
    ADD_WEIGHTED_VECTORS(__m512, 16, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_add_ps, _mm512_mul_ps)
}

static int attention_fast(const attention_job *job) {
    return job->rows == 1 && job->packed && job->d % 16 == 0 && job->q_heads / job->kv_heads <= ATTENTION_FAST_STATES;
}

static void attention_span_fast(const attention_job *job, int64_t b, int64_t h, int64_t first, int64_t last,
                                float *key, float *values, float *score, float *state) {
    const int64_t d = job->d, states = job->q_heads / job->kv_heads, rb = job->row_bytes;
    const int64_t kv = (b * job->kv_heads + h) * job->tokens, stride = ATTENTION_BLOCK + 8;
    float *top = state, *total = state + states, *acc = state + 2 * states;
    const float *q = job->q + (b * job->q_heads + h * states) * d, *mask = job->mask;
    for (int64_t s = 0; s < states; s++) { top[s] = -INFINITY; total[s] = 0.0f; }
    memset(acc, 0, sizeof(float) * states * d);
    for (int64_t t0 = first; t0 < last; t0 += ATTENTION_BLOCK) {
        const int64_t count = last - t0 < ATTENTION_BLOCK ? last - t0 : ATTENTION_BLOCK;
        if (mask && !block_seen(mask, b * job->mb, h * states, states, 1, job->mh, job->mr, t0, count)) continue;
        const int64_t seen = job->causal ? (1 - t0 < count ? 1 - t0 : count) : count;
        if (seen <= 0) continue;
        const int64_t whole = seen / 8 * 8;
        scores_block(q, (int)states, job, kv + t0, whole / 8, score, stride);
        for (int64_t j = whole; j < seen; j++) {  /* the last keys one at a time, as dot() */
            const int64_t t = kv + t0 + j;
            dequantize_row(job->k_codes + t * rb, job->k_scale[t], job->k_zero[t], key, d, 1);
            for (int64_t s = 0; s < states; s++) score[s * stride + j] = dot(q + s * d, key, d);
        }
        for (int64_t j = 0; j < seen; j++) {
            const int64_t t = kv + t0 + j;
            const __m512 zero = _mm512_set1_ps(job->v_zero[t]), step = _mm512_set1_ps(job->v_scale[t]);
            for (int64_t i = 0; i < d; i += 16)
                _mm512_storeu_ps(values + j * d + i,
                                 codes16(_mm_loadl_epi64((const __m128i *)(job->v_codes + t * rb + i / 2)), zero, step));
        }
        for (int64_t s = 0; s < states; s++) {
            if (isnan(total[s])) continue;  /* NaN: a NaN score was seen, SDPA's row is NaN */
            float *sc = score + s * stride;
            const float *added = mask ? mask + b * job->mb + (h * states + s) * job->mh + t0 : NULL;
            for (int64_t j = 0; j < seen; j++) sc[j] = sc[j] * job->scale + (added ? added[j] : 0.0f);
            if (block_weights(sc, seen, top + s, total + s, acc + s * d, d, NULL)) add_weighted16(acc + s * d, sc, values, seen, d);
        }
    }
}
#else
#define ATTENTION_FAST_STATES 1
static int attention_fast(const attention_job *job) { (void)job; return 0; }
static void attention_span_fast(const attention_job *job, int64_t b, int64_t h, int64_t first, int64_t last,
                                float *key, float *values, float *score, float *state) {
    (void)job; (void)b; (void)h; (void)first; (void)last; (void)key; (void)values; (void)score; (void)state;
}
#endif

static void *attention_run(void *arg) {
    const attention_job *job = *(attention_job *const *)arg;
    const int64_t d = job->d, states = job->q_heads / job->kv_heads * job->rows;
    float *keys = malloc(sizeof(float) * ATTENTION_BLOCK * d), *values = malloc(sizeof(float) * ATTENTION_BLOCK * d);
    if (!keys || !values) { free(keys); free(values); return (void *)1; }
    float score[ATTENTION_FAST_STATES * (ATTENTION_BLOCK + 8)];
    const int fast = attention_fast(job);
    for (int64_t unit; (unit = __atomic_fetch_add(job->next, 1, __ATOMIC_RELAXED)) < job->units;) {
        const int64_t pair = unit / job->spans, first = unit % job->spans * ATTENTION_SPAN;
        const int64_t last = first + ATTENTION_SPAN < job->tokens ? first + ATTENTION_SPAN : job->tokens;
        (fast ? attention_span_fast : attention_span)(job, pair / job->kv_heads, pair % job->kv_heads, first, last,
                                                      keys, values, score, job->state + unit * states * (d + 2));
    }
    free(keys); free(values);
    return NULL;
}

/* A query state's spans merged in order (each rescaled to the largest maximum), then its row. A
 * single span is its own result (factor expf(0) = 1): the bits of the one-pass kernel. */
static void merge_spans(const float *state, int64_t spans, int64_t states, int64_t s, int64_t d, float *a, float *o) {
    const int64_t stride = states * (d + 2);
    float most = -INFINITY, total = 0.0f;
    for (int64_t c = 0; c < spans; c++) {
        const float t = state[c * stride + s], sum = state[c * stride + states + s];
        if (isnan(sum)) total = NAN;
        if (sum > 0.0f && t > most) most = t;
    }
    memset(a, 0, sizeof(float) * d);
    for (int64_t c = 0; c < spans && !isnan(total); c++) {
        const float *part = state + c * stride;
        if (!(part[states + s] > 0.0f)) continue;  /* nothing seen in this span */
        const float factor = expf(part[s] - most), *acc = part + 2 * states + s * d;
        total += part[states + s] * factor;
        for (int64_t i = 0; i < d; i++) a[i] += acc[i] * factor;
    }
    finish_row(o, a, total, d);
}

int packed_attention(const float *q, const uint8_t *k_codes, const float *k_scale, const float *k_zero,
                     const uint8_t *v_codes, const float *v_scale, const float *v_zero, float *out, int64_t batch,
                     int64_t q_heads, int64_t kv_heads, int64_t rows, int64_t tokens, int64_t d, int64_t row_bytes,
                     int64_t packed, float scale, int64_t causal, const float *mask, int64_t mb, int64_t mh,
                     int64_t mr, int64_t threads) {
    const int64_t groups = q_heads / kv_heads, states = groups * rows;
    const int64_t spans = (tokens + ATTENTION_SPAN - 1) / ATTENTION_SPAN, units = batch * kv_heads * spans;
    int64_t next = 0;
    attention_job job = {q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, mask, q_heads, kv_heads, rows,
                         tokens, d, row_bytes, packed, causal, mb, mh, mr, spans, units, &next, scale,
                         malloc(sizeof(float) * (size_t)(units * states * (d + 2)))};
    float *a = malloc(sizeof(float) * d);
    if (!job.state || !a) { free(job.state); free(a); return 1; }
    threads = thread_count(threads, units, units);
    attention_job *jobs[MAX_THREADS];
    for (int64_t t = 0; t < threads; t++) jobs[t] = &job;
    int failed = run_jobs(attention_run, jobs, sizeof jobs[0], threads);
    for (int64_t pair = 0; !failed && pair < batch * kv_heads; pair++)
        for (int64_t s = 0; s < states; s++) {
            const int64_t b = pair / kv_heads, h = pair % kv_heads, g = s / rows, r = s % rows;
            merge_spans(job.state + pair * spans * states * (d + 2), spans, states, s, d, a,
                        out + ((b * q_heads + h * groups + g) * rows + r) * d);
        }
    free(job.state); free(a);
    return failed;
}

/* int8_query_attention: packed_attention for a prefill (many query rows, 4-bit packed keys and
 * values), with Q·Kᵀ in integers. Each query row is quantized to int8 as
 * numerics.quant.fake_quant_symmetric(q, 8) does (scale max|q| / 127, q / scale rounded half to
 * even), and its sums with a block of key codes are int4_gemm's tiles (vpmaddubsw, or VNNI's
 * vpdpbusd: exact), so a score is ((float)sum(q·c) - z·sum(q)) · (q scale · scale) · k scale, c
 * the key's codes and z its zero point. The weights come from the decode kernel's online softmax
 * (block_weights; in 16 lanes in the AVX512 builds: block_value_weights). P·V takes the values as
 * their centered codes n = c - 8 (exact small integers) and each weight times its value's scale,
 * w = p·s, as an 8-bit code counting steps of the block's largest value scale times its largest p,
 * over 255 (code_ratio); the zero points' share, sum w·(8 - z) with w uncoded, is added in float32.
 * With AVX512-VNNI one vpdpbusd does 64 of those multiply-adds in int32 (add_weighted_quads);
 * elsewhere fp32 FMAs of the same integers (add_weighted_rows), exact in any order, so every build
 * computes the same numbers to float rounding. A weight moves by at most half a step: an output by
 * at most (largest s · largest p) / 510 · sum |n| per block, a few percent of the 4-bit values' own
 * rounding (s/2 per unit of weight) where the attention is spread over the block, less where it is
 * peaked. Why: prefill attention is Q·Kᵀ and P·V in equal parts; both now run one VNNI instruction
 * per 64 multiply-adds (two byte-multiply instructions per 32 with AVX2) where fp32 runs 16 per
 * FMA; bfloat16 weights (vdpbf16ps, 32 per instruction) had P·V at 36% of the kernel, the 8-bit
 * codes 0.9x the kernel's time on an AVX512-BF16 EPYC. Work units are (batch, kv
 * head, block of QA_ROWS query positions), all query heads of the kv head together, over blocks
 * of QA_KEYS keys (causal: the keys up to the block's last position); whichever thread is free
 * takes the next unit, costliest first. A unit's values do not depend on its thread: the same
 * bits for any thread count. causal: SDPA's is_causal (top-left); otherwise no mask. Returns 1 on
 * no memory, 2 where this build cannot (no AVX2, or d not a multiple of 8). */
#define QA_ROWS 64
#define QA_KEYS 128

#ifdef __AVX2__
typedef struct {
    const float *q; const uint8_t *k_codes; const float *k_scale, *k_zero; const uint8_t *v_codes;
    const float *v_scale, *v_zero; float *out;
    int64_t batch, q_heads, kv_heads, rows, tokens, d, causal, *next;
    float scale;
} query_attention_job;

/* `count` query rows as int8 codes in int4_gemm's half-split order
 * (element 2m of a cached vector is byte m's low nibble, 2m + 1 its high one, and int4_gemm
 * pairs x[m] with byte m's low nibble, x[m + d/2] with its high one), their scales times the
 * softmax scale, and their sums. */
static void quantize_queries(const float *q, int64_t count, int64_t d, float scale, int8_t *codes, float *scales,
                             int32_t *sums) {
    /* 8 lanes at a time (d % 8 == 0): the same IEEE max, division and round-half-even as the
     * scalar loop this replaced, so the same codes */
    const __m256 sign = _mm256_set1_ps(-0.0f), limit = _mm256_set1_ps(127.0f);
    for (int64_t r = 0; r < count; r++) {
        const float *row = q + r * d;
        __m256 most = _mm256_setzero_ps(), finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        for (int64_t i = 0; i < d; i += 8) {
            const __m256 v = _mm256_loadu_ps(row + i);
            most = _mm256_max_ps(most, _mm256_andnot_ps(sign, v));
            finite = _mm256_and_ps(finite, _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_EQ_OQ));
        }
        float lanes[8], top = 0.0f;
        _mm256_storeu_ps(lanes, most);
        for (int c = 0; c < 8; c++) top = lanes[c] > top ? lanes[c] : top;
        const int all_finite = _mm256_movemask_ps(finite) == 0xFF;
        const float step = top / 127.0f;
        int32_t sum = 0;
        for (int64_t i = 0; i < d; i += 8) {
            int32_t c[8] = {0};
            if (all_finite && step > 0.0f) {
                __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(row + i), _mm256_set1_ps(step)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                v = _mm256_max_ps(_mm256_min_ps(v, limit), _mm256_xor_ps(limit, sign));
                _mm256_storeu_si256((__m256i *)c, _mm256_cvtps_epi32(v));
            }
            for (int j = 0; j < 8; j++) {  /* int4_gemm's half-split order */
                codes[r * d + ((i + j) & 1) * (d / 2) + (i + j) / 2] = (int8_t)c[j];
                sum += c[j];
            }
        }
        scales[r] = all_finite ? step * scale : NAN;  /* a NaN or infinite query: NaN scores, a NaN row, as SDPA's */
        sums[r] = sum;
    }
}

/* P·V's block sums where VNNI is missing: acc[i][:] += (sum_j weights[i][j] · values[j][:]) ·
 * steps[i] for GEMM_MR rows (acc's d apart, weights' `stride` apart) over `count` tokens, 16
 * columns at a time, each load of values serving four rows. The weights are integers in [0, 255]
 * (weight_codes) and the values centered codes in [-8, 7]: every product and partial sum is an
 * integer below 2^24, exact in float32 in any order, so these are VNNI's integer sums
 * (add_weighted_quads), and the fold is the same multiply, then add: the same bits. d % 8 == 0. */
static void add_weighted_rows(float *acc, const float *weights, int64_t stride, const float *values, int64_t count,
                              int64_t d, const float *steps) {
    for (int64_t c = 0; c < d; c += 16) {
        const int wide = c + 16 <= d;
        __m256 a[GEMM_MR][2];
        for (int i = 0; i < GEMM_MR; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
        for (int64_t j = 0; j < count; j++) {
            const __m256 v0 = _mm256_loadu_ps(values + j * d + c);
            const __m256 v1 = wide ? _mm256_loadu_ps(values + j * d + c + 8) : _mm256_setzero_ps();
#pragma GCC unroll 4
            for (int i = 0; i < GEMM_MR; i++) {
                const __m256 w = _mm256_broadcast_ss(weights + i * stride + j);
                a[i][0] = _mm256_fmadd_ps(w, v0, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(w, v1, a[i][1]);
            }
        }
        for (int i = 0; i < GEMM_MR; i++) {
            const __m256 step = _mm256_set1_ps(steps[i]);
            float *out = acc + i * d + c;
            _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), _mm256_mul_ps(a[i][0], step)));
            if (wide) _mm256_storeu_ps(out + 8, _mm256_add_ps(_mm256_loadu_ps(out + 8), _mm256_mul_ps(a[i][1], step)));
        }
    }
}

/* P·V takes a row's block weights w = p · value scale as 8-bit codes q = min(round(w · ratio), 255),
 * half to even, each counting `step` = bound / 255 of weight, the bound the block's largest value
 * scale times its largest p, exp(block maximum - running maximum) (libm's expf: the same in every
 * build, so every build forms the same codes). A weight moves by at most half a step. Returns the
 * ratio 255 / bound (0, and every code 0, where that is not finite: no weight worth a code). */
static float code_ratio(float value_top, float block_top, float new_top, float *step) {
    const float bound = value_top * expf(block_top - new_top), ratio = 255.0f / bound;
    *step = isfinite(ratio) && bound > 0.0f ? bound / 255.0f : 0.0f;
    return *step > 0.0f ? ratio : 0.0f;
}

/* One query row's block weights p (keys of them, zeros up to QA_KEYS after) as P·V takes them:
 * w = p · value scale, the row's sums a getting the zero points' share sum w·(8 - z) in float32;
 * then w's code (code_ratio) as an integer-valued float, over w. */
static void value_weights(float *weights, const float *value_scale, const float *value_shift, float *a, int64_t d,
                          float ratio) {
    const __m256 scale = _mm256_set1_ps(ratio), most = _mm256_set1_ps(255.0f);
    __m256 share = _mm256_setzero_ps();
    for (int64_t j = 0; j < QA_KEYS; j += 8) {
        const __m256 w = _mm256_mul_ps(_mm256_loadu_ps(weights + j), _mm256_loadu_ps(value_scale + j));
        share = _mm256_fmadd_ps(w, _mm256_loadu_ps(value_shift + j), share);
        _mm256_storeu_ps(weights + j, _mm256_min_ps(_mm256_round_ps(_mm256_mul_ps(w, scale),
                                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), most));
    }
    float lanes[8], total = 0.0f;
    _mm256_storeu_ps(lanes, share);
    for (int c = 0; c < 8; c++) total += lanes[c];
    if (total != 0.0f)
        for (int64_t i = 0; i < d; i++) a[i] += total;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QA_WIDE 1
/* exp_lanes on 16 lanes: the same operations lane by lane, so the same values. */
static inline __m512 exp_lanes16(__m512 x) {
    const __m512 floor_x = _mm512_set1_ps(EXP_FLOOR);
    const __mmask16 below = _mm512_cmp_ps_mask(x, floor_x, _CMP_LT_OQ);
    x = _mm512_max_ps(floor_x, x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HIGH), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LOW), r);
    __m512 p = _mm512_set1_ps(EXP_P5);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P1));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i power = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps((__mmask16)~below, p, _mm512_castsi512_ps(power));
}

/* A row's block weights for P·V in one pass over 16 lanes (the AVX512 builds' int8_query_attention
 * only: their numbers differ from the 8-lane builds' by float rounding): block_weights' online
 * softmax (the same weights lane by lane; the maximum and the sums in 16 lanes), then
 * value_weights' w = p · value scale, the zero points' share into a and the largest w into
 * *top_weight, the weights of keys past `seen` 0. Returns 0 where block_weights would (no weights
 * formed: all zeros). */
static int block_value_weights(float *score, int64_t seen, float *top, float *total, float *a, int64_t d,
                               const float *value_scale, const float *value_shift, float value_top, uint8_t *bytes,
                               float *step) {
    __m512 most = _mm512_set1_ps(-INFINITY);
    __mmask16 unordered = 0;
    for (int64_t j = 0; j < seen; j += 16) {
        const __mmask16 live = seen - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (seen - j)) - 1);
        const __m512 v = _mm512_mask_loadu_ps(most, live, score + j);
        most = _mm512_max_ps(most, v);
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    const float block_top = _mm512_reduce_max_ps(most);
    if (unordered) *total = NAN;
    if (isnan(*total) || block_top == -INFINITY) {
        memset(bytes, 0, QA_KEYS);
        *step = 0.0f;
        return 0;
    }
    const float new_top = block_top > *top ? block_top : *top;
    if (*top != -INFINITY && new_top != *top) {
        const float shrink = expf(*top - new_top);
        *total *= shrink;
        for (int64_t i = 0; i < d; i++) a[i] *= shrink;
    }
    *top = new_top;
    __m512 sum = _mm512_setzero_ps(), share = _mm512_setzero_ps();
    const __m512 shift = _mm512_set1_ps(new_top), codes_most = _mm512_set1_ps(255.0f);
    const __m512 ratio = _mm512_set1_ps(code_ratio(value_top, block_top, new_top, step));
    for (int64_t j = 0; j < QA_KEYS; j += 16) {
        const __mmask16 live = seen - j >= 16 ? (__mmask16)0xFFFF
                               : seen > j ? (__mmask16)((1u << (seen - j)) - 1) : (__mmask16)0;
        const __m512 p = _mm512_maskz_mov_ps(live, exp_lanes16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, score + j), shift)));
        sum = _mm512_add_ps(sum, p);
        const __m512 w = _mm512_mul_ps(p, _mm512_loadu_ps(value_scale + j));
        share = _mm512_fmadd_ps(w, _mm512_loadu_ps(value_shift + j), share);
        const __m512 q = _mm512_min_ps(_mm512_roundscale_ps(_mm512_mul_ps(w, ratio),
                                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), codes_most);
        _mm_storeu_si128((__m128i *)(bytes + j), _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(q)));
    }
    *total += _mm512_reduce_add_ps(sum);
    const float zeros_share = _mm512_reduce_add_ps(share);
    if (zeros_share != 0.0f)
        for (int64_t i = 0; i < d; i++) a[i] += zeros_share;
    return 1;
}
/* A block's values as vpdpbusd takes them: panel[m][c] holds the centered codes (int8) of column c
 * of tokens 4m .. 4m + 3, a token past `keys` as zeros; rows `stride` columns apart (a multiple of
 * 64, zeros past d). A stored nibble is already c - 8 in two's complement (kv_dequantize): a
 * table sign-extends it. */
static void value_quads(const uint8_t *codes, int64_t row_bytes, int64_t keys, int64_t d, int64_t stride,
                        uint8_t *panel) {
    const __m128i extend = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    for (int64_t m = 0; m < (keys + 3) / 4; m++)
        for (int64_t c = 0; c < d; c += 16) {
            __m128i e[4];
            for (int k = 0; k < 4; k++) {
                __m128i b = _mm_setzero_si128();
                if (4 * m + k < keys) {
                    const uint8_t *row = codes + (4 * m + k) * row_bytes + c / 2;
                    if (c + 16 <= d) b = _mm_loadl_epi64((const __m128i *)row);
                    else { int32_t word; memcpy(&word, row, 4); b = _mm_cvtsi32_si128(word); }  /* the last 8 columns */
                }
                e[k] = _mm_shuffle_epi8(extend, nibbles(b));
            }
            const __m128i t01 = _mm_unpacklo_epi8(e[0], e[1]), u01 = _mm_unpackhi_epi8(e[0], e[1]);
            const __m128i t23 = _mm_unpacklo_epi8(e[2], e[3]), u23 = _mm_unpackhi_epi8(e[2], e[3]);
            __m128i *out = (__m128i *)(panel + (m * stride + c) * 4);
            _mm_storeu_si128(out, _mm_unpacklo_epi16(t01, t23));      /* columns c .. c + 3 */
            _mm_storeu_si128(out + 1, _mm_unpackhi_epi16(t01, t23));  /* c + 4 .. c + 7 */
            _mm_storeu_si128(out + 2, _mm_unpacklo_epi16(u01, u23));  /* c + 8 .. c + 11 */
            _mm_storeu_si128(out + 3, _mm_unpackhi_epi16(u01, u23));  /* c + 12 .. c + 15 */
        }
}

/* add_weighted_rows with vpdpbusd: for GEMM_MR rows, the integer sums over `quads` of tokens of
 * each row's weight codes (bytes, `stride` apart; unsigned) times the values' centered codes
 * (value_quads; signed), 64 columns (four registers) at a time, 64 multiply-adds an instruction
 * where vdpbf16ps did 32; then acc += (float)sum · steps[i], masked past d. */
static void add_weighted_quads(float *acc, const uint8_t *weights, int64_t stride, const uint8_t *values,
                               int64_t quads, int64_t d, int64_t values_stride, const float *steps) {
    for (int64_t c0 = 0; c0 < d; c0 += 64) {
        __mmask16 mask[4];
        __m512i sum[GEMM_MR][4];
        for (int k = 0; k < 4; k++) {
            const int64_t left = d - c0 - 16 * k;
            mask[k] = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : (__mmask16)0;
        }
        for (int i = 0; i < GEMM_MR; i++)
            for (int k = 0; k < 4; k++) sum[i][k] = _mm512_setzero_si512();
        for (int64_t m = 0; m < quads; m++) {
            const uint8_t *row = values + (m * values_stride + c0) * 4;
            __m512i v[4];
            for (int k = 0; k < 4; k++) v[k] = _mm512_loadu_si512((const void *)(row + 64 * k));
            for (int i = 0; i < GEMM_MR; i++) {
                int32_t four;
                memcpy(&four, weights + i * stride + 4 * m, 4);
                const __m512i w = _mm512_set1_epi32(four);
                for (int k = 0; k < 4; k++) sum[i][k] = _mm512_dpbusd_epi32(sum[i][k], w, v[k]);
            }
        }
        for (int i = 0; i < GEMM_MR; i++) {
            const __m512 step = _mm512_set1_ps(steps[i]);
            for (int k = 0; k < 4; k++) {
                float *out = acc + i * d + c0 + 16 * k;
                const __m512 a = _mm512_maskz_loadu_ps(mask[k], out);
                _mm512_mask_storeu_ps(out, mask[k], _mm512_add_ps(a, _mm512_mul_ps(_mm512_cvtepi32_ps(sum[i][k]), step)));
            }
        }
    }
}
#else
#define QA_WIDE 0
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define QA_SCORES16 1
/* vnni_tile's sums for GEMM_MR query rows and one panel of GEMM_NR (16) keys, turned into
 * scores while still in registers: ((float)sum - z·Σq) · (q scale) · k scale, the 8-lane
 * epilogue's operations lane by lane (the same bits), without the int32 tile's store and reload.
 * Rows past `rows` (a last partial tile's padding) are not written. */
static inline void scores16(const int8_t *x, int64_t k, const uint8_t *panel, const int32_t *sums, const float *scales,
                            const float *key_zero, const float *key_scale, float *score, int64_t rows) {
    __m512i wide[GEMM_MR];
    vnni_tile(x, k, panel, wide);
    const __m512 zero = _mm512_loadu_ps(key_zero), scale = _mm512_loadu_ps(key_scale);
    for (int i = 0; i < GEMM_MR && i < rows; i++) {
        __m512 v = _mm512_cvtepi32_ps(wide[i]);
        v = _mm512_sub_ps(v, _mm512_mul_ps(zero, _mm512_set1_ps((float)sums[i])));
        v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(scales[i])), scale);
        _mm512_storeu_ps(score + i * (QA_KEYS + 8), v);
    }
}
#else
#define QA_SCORES16 0
#endif

static void *query_attention_run(void *arg) {
    const query_attention_job *job = arg;
    const int64_t d = job->d, groups = job->q_heads / job->kv_heads, per_head = job->batch * job->kv_heads;
    const int64_t blocks = (job->rows + QA_ROWS - 1) / QA_ROWS, most = groups * QA_ROWS + GEMM_MR;
    const int64_t panels = QA_KEYS / GEMM_NR, row_bytes = d / 2;
    int8_t *codes = calloc((size_t)(most * d), 1);
    uint8_t *panel = malloc((size_t)(panels * d * GEMM_NR));
    float *scales = calloc((size_t)most, sizeof(float)), *score = malloc(sizeof(float) * (size_t)(most * (QA_KEYS + 8)));
    float *acc = malloc(sizeof(float) * (size_t)(most * d)), *top = malloc(sizeof(float) * (size_t)(2 * most));
    /* the block's values: fp32 centered codes, or (QA_WIDE) int8 ones in quads of tokens with the
     * weights' codes as bytes; each row's weight step */
    const int64_t quad_stride = (d + 63) / 64 * 64;
    float *values = QA_WIDE ? NULL : malloc(sizeof(float) * (size_t)(QA_KEYS * d));
    uint8_t *value_panel = QA_WIDE ? calloc((size_t)(QA_KEYS / 4 * quad_stride), 4) : NULL;
    uint8_t *weight_bytes = QA_WIDE ? malloc((size_t)(most * QA_KEYS)) : NULL;
    float *weight_step = calloc((size_t)most, sizeof(float));
    int32_t *sums = calloc((size_t)most, sizeof(int32_t));
#if !QA_SCORES16
    int32_t tile[GEMM_MR][GEMM_NR];
#endif
    void *failed = !codes || !panel || !scales || !score || !acc || !top || !sums || !weight_step
                   || (QA_WIDE ? !value_panel || !weight_bytes : !values) ? (void *)1 : NULL;
#if !QA_SCORES16
    /* |q code| <= 127 and key codes <= 15: pairs of products fit int16 this many quads at a time */
    const int64_t steps = 32767 / (2 * 15 * 127);
#endif
    for (int64_t unit; !failed && (unit = __atomic_fetch_add(job->next, 1, __ATOMIC_RELAXED)) < blocks * per_head;) {
        const int64_t block = blocks - 1 - unit / per_head, b = unit % per_head / job->kv_heads, h = unit % job->kv_heads;
        const int64_t first = block * QA_ROWS, count = job->rows - first < QA_ROWS ? job->rows - first : QA_ROWS;
        const int64_t states = groups * count, kv = (b * job->kv_heads + h) * job->tokens;
        const int64_t end = job->causal && first + count < job->tokens ? first + count : job->tokens;
        float *total = top + most;
        for (int64_t g = 0; g < groups; g++)
            quantize_queries(job->q + ((b * job->q_heads + h * groups + g) * job->rows + first) * d, count, d,
                             job->scale, codes + g * count * d, scales + g * count, sums + g * count);
        memset(codes + states * d, 0, (size_t)(GEMM_MR * d));  /* a last partial tile's rows add nothing */
        for (int64_t s = 0; s < states; s++) { top[s] = -INFINITY; total[s] = 0.0f; }
        memset(acc, 0, sizeof(float) * (size_t)(most * d));
        for (int64_t t0 = 0; t0 < end; t0 += QA_KEYS) {
            const int64_t keys = end - t0 < QA_KEYS ? end - t0 : QA_KEYS, used = (keys + GEMM_NR - 1) / GEMM_NR;
            const int64_t at = kv + t0;
            /* 0 past the last key: no read past the cache */
            float key_scale[QA_KEYS], key_zero[QA_KEYS], value_scale[QA_KEYS], value_shift[QA_KEYS], value_top = 0.0f;
            for (int64_t j = 0; j < QA_KEYS; j++) {
                key_scale[j] = j < keys ? job->k_scale[at + j] : 0.0f;
                key_zero[j] = j < keys ? job->k_zero[at + j] : 0.0f;
                value_scale[j] = j < keys ? job->v_scale[at + j] : 0.0f;
                value_shift[j] = j < keys ? 8.0f - job->v_zero[at + j] : 0.0f;
                value_top = value_scale[j] > value_top ? value_scale[j] : value_top;
            }
            for (int64_t p = 0; p < used; p++) pack_panel(job->k_codes + at * row_bytes, panel + p * d * GEMM_NR, d, keys, p * GEMM_NR);
#if QA_WIDE
            value_quads(job->v_codes + at * row_bytes, row_bytes, keys, d, quad_stride, value_panel);
#else
            for (int64_t j = 0; j < keys; j++)  /* centered codes: (c - 8) * 1 */
                dequantize_row(job->v_codes + (at + j) * row_bytes, 1.0f, 8.0f, values + j * d, d, 1);
#endif
            for (int64_t s0 = 0; s0 < states; s0 += GEMM_MR)
                for (int64_t p = 0; p < used; p++) {
#if QA_SCORES16
                    scores16(codes + s0 * d, d, panel + p * d * GEMM_NR, sums + s0, scales + s0,
                             key_zero + p * GEMM_NR, key_scale + p * GEMM_NR,
                             score + s0 * (QA_KEYS + 8) + p * GEMM_NR, states - s0);
#else
                    gemm_tile(codes + s0 * d, d, panel + p * d * GEMM_NR, steps, tile);
                    for (int64_t i = 0; i < GEMM_MR && s0 + i < states; i++) {
                        const __m256 sum = _mm256_set1_ps((float)sums[s0 + i]), step = _mm256_set1_ps(scales[s0 + i]);
                        for (int64_t c = 0; c < GEMM_NR; c += 8) {
                            const int64_t j = p * GEMM_NR + c;
                            __m256 v = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(tile[i] + c)));
                            v = _mm256_sub_ps(v, _mm256_mul_ps(_mm256_loadu_ps(key_zero + j), sum));
                            v = _mm256_mul_ps(_mm256_mul_ps(v, step), _mm256_loadu_ps(key_scale + j));
                            _mm256_storeu_ps(score + (s0 + i) * (QA_KEYS + 8) + p * GEMM_NR + c, v);
                        }
                    }
#endif
                }
            const int64_t tiled = (states + GEMM_MR - 1) / GEMM_MR * GEMM_MR;
            for (int64_t s = 0; s < tiled; s++) {  /* the weights, 0 past what a row sees (and in padding rows) */
                float *weights = score + s * (QA_KEYS + 8);
                const int64_t position = first + s % count;
                const int64_t seen = s >= states ? 0 : job->causal ? (position + 1 - t0 < keys ? position + 1 - t0 : keys) : keys;
#if QA_WIDE
                if (seen > 0 && !isnan(total[s]))
                    block_value_weights(weights, seen, top + s, total + s, acc + s * d, d, value_scale, value_shift,
                                        value_top, weight_bytes + s * QA_KEYS, weight_step + s);
                else {
                    memset(weight_bytes + s * QA_KEYS, 0, QA_KEYS);
                    weight_step[s] = 0.0f;
                }
#else
                float block_top = 0.0f, ratio = 0.0f;
                const int64_t formed = seen > 0 && !isnan(total[s]) && block_weights(weights, seen, top + s, total + s,
                                                                                      acc + s * d, d, &block_top) ? seen : 0;
                memset(weights + formed, 0, sizeof(float) * (size_t)(QA_KEYS - formed));
                weight_step[s] = 0.0f;
                if (formed) ratio = code_ratio(value_top, block_top, top[s], weight_step + s);
                value_weights(weights, value_scale, value_shift, acc + s * d, d, ratio);
#endif
            }
            for (int64_t s0 = 0; s0 < states; s0 += GEMM_MR)
#if QA_WIDE
                add_weighted_quads(acc + s0 * d, weight_bytes + s0 * QA_KEYS, QA_KEYS, value_panel, (keys + 3) / 4, d,
                                   quad_stride, weight_step + s0);
#else
                add_weighted_rows(acc + s0 * d, score + s0 * (QA_KEYS + 8), QA_KEYS + 8, values, keys, d,
                                  weight_step + s0);
#endif
        }
        for (int64_t s = 0; s < states; s++) {
            const int64_t g = s / count, r = first + s % count;
            finish_row(job->out + ((b * job->q_heads + h * groups + g) * job->rows + r) * d, acc + s * d, total[s], d);
        }
    }
    free(codes); free(panel); free(scales); free(score); free(acc); free(top); free(values); free(value_panel);
    free(weight_bytes); free(weight_step); free(sums);
    return failed;
}
#endif

int int8_query_attention(const float *q, const uint8_t *k_codes, const float *k_scale, const float *k_zero,
                         const uint8_t *v_codes, const float *v_scale, const float *v_zero, float *out, int64_t batch,
                         int64_t q_heads, int64_t kv_heads, int64_t rows, int64_t tokens, int64_t d, float scale,
                         int64_t causal, int64_t threads) {
#ifdef __AVX2__
    if (d % 8 || d < 8) return 2;
    int64_t next = 0;
    const int64_t units = batch * kv_heads * ((rows + QA_ROWS - 1) / QA_ROWS);
    threads = thread_count(threads, units, units);
    query_attention_job jobs[MAX_THREADS];
    for (int64_t t = 0; t < threads; t++)
        jobs[t] = (query_attention_job){q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, out, batch, q_heads,
                                        kv_heads, rows, tokens, d, causal, &next, scale};
    return run_jobs(query_attention_run, jobs, sizeof jobs[0], threads);
#else
    (void)q; (void)k_codes; (void)k_scale; (void)k_zero; (void)v_codes; (void)v_scale; (void)v_zero; (void)out;
    (void)batch; (void)q_heads; (void)kv_heads; (void)rows; (void)tokens; (void)d; (void)scale; (void)causal;
    (void)threads;
    return 2;
#endif
}

/* kv_quantize: asymmetric codes of each [length] vector of x, as numerics.quant.asymmetric_codes
 * computes them in float32, op for op (clamped range times clip, scale, rounded zero point,
 * round-half-even codes clamped to [0, 2^bits - 1]), packed as the reference packs them. A decode
 * step quantizes one token per head: the reference's dozen torch calls cost far more than the
 * arithmetic. A prefill quantizes thousands (2048 tokens x kv heads x keys and values, every
 * layer): 8 lanes at a time (max and min are exact in any order; the same IEEE division and
 * round-half-even per element) and the rows split over threads, each row the same bits on any.
 * Returns 1, having written nothing reliable, if a vector holds a NaN or an infinity: the caller
 * then runs the reference, whose non-finite semantics are torch's. */
typedef struct {
    const float *x; uint8_t *codes; float *scale, *zero;
    int64_t first, last, length, row_bytes, bits, packed;
    float clip;
} kv_quantize_job;

/* One vector's range; 0 if a value is not finite. */
static int vector_range(const float *v, int64_t length, float *hi, float *lo) {
    int64_t i = 0;
    float top = v[0], bottom = v[0];
#ifdef __AVX2__
    if (length >= 8) {
        __m256 most = _mm256_loadu_ps(v), least = most, bad = _mm256_setzero_ps();
        for (; i + 8 <= length; i += 8) {
            const __m256 x = _mm256_loadu_ps(v + i);
            most = _mm256_max_ps(most, x);
            least = _mm256_min_ps(least, x);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(x, x), _mm256_setzero_ps(), _CMP_NEQ_UQ));
        }
        if (_mm256_movemask_ps(bad)) return 0;
        float a[8], b[8];
        _mm256_storeu_ps(a, most);
        _mm256_storeu_ps(b, least);
        for (int c = 0; c < 8; c++) {
            top = a[c] > top ? a[c] : top;
            bottom = b[c] < bottom ? b[c] : bottom;
        }
    }
#endif
    for (; i < length; i++) {
        if (!isfinite(v[i])) return 0;
        top = v[i] > top ? v[i] : top;
        bottom = v[i] < bottom ? v[i] : bottom;
    }
    *hi = top;
    *lo = bottom;
    return 1;
}

static int kv_quantize_row(const float *v, uint8_t *out, float *scale, float *zero, int64_t length,
                           int64_t row_bytes, float levels, float clip, int64_t packed) {
    float hi, lo;
    if (!vector_range(v, length, &hi, &lo)) return 1;
    hi = (hi < 0.0f ? 0.0f : hi) * clip;
    lo = (lo > 0.0f ? 0.0f : lo) * clip;
    float s = (hi - lo) / levels;
    if (s == 0.0f) s = 1.0f;
    const float z = nearbyintf(-lo / s);
    *scale = s;
    *zero = z;
    int64_t i = 0;
#ifdef __AVX2__
    if (packed) {  /* 8 codes, c - 8 in two's complement nibbles, into 4 bytes */
        const __m256 step = _mm256_set1_ps(s), shift = _mm256_set1_ps(z), top = _mm256_set1_ps(levels);
        const __m256i eight = _mm256_set1_epi32(8), nibble = _mm256_set1_epi32(15);
        const __m256i gather = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        for (; i + 8 <= length; i += 8) {
            __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(v + i), step),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, shift), _mm256_setzero_ps()), top);
            __m256i c = _mm256_and_si256(_mm256_sub_epi32(_mm256_cvtps_epi32(q), eight), nibble);
            c = _mm256_shuffle_epi8(_mm256_or_si256(c, _mm256_srli_epi64(c, 28)), gather);  /* even | odd << 4 */
            const uint16_t low = (uint16_t)_mm256_extract_epi16(c, 0), high = (uint16_t)_mm256_extract_epi16(c, 8);
            memcpy(out + i / 2, &low, 2);
            memcpy(out + i / 2 + 2, &high, 2);
        }
    }
#endif
    for (int64_t b = i / 2; b < row_bytes && packed; b++) out[b] = 0;
    for (; i < length; i++) {
        float q = nearbyintf(v[i] / s) + z;
        q = q < 0.0f ? 0.0f : (q > levels ? levels : q);
        if (packed)
            out[i >> 1] |= (uint8_t)((((int)q - 8) & 15) << (4 * (i & 1)));
        else
            out[i] = (uint8_t)q;
    }
    return 0;
}

static void *kv_quantize_run(void *arg) {
    const kv_quantize_job *job = arg;
    const float levels = (float)((1 << job->bits) - 1);
    for (int64_t r = job->first; r < job->last; r++)
        if (kv_quantize_row(job->x + r * job->length, job->codes + r * job->row_bytes, job->scale + r, job->zero + r,
                            job->length, job->row_bytes, levels, job->clip, job->packed))
            return (void *)1;
    return NULL;
}

/* Rows worth a thread: starting one costs about as much as quantizing this many values. */
#define KV_QUANTIZE_VALUES_PER_THREAD (1 << 15)

int kv_quantize(const float *x, uint8_t *codes, float *scale, float *zero, int64_t rows, int64_t length,
                int64_t row_bytes, int64_t bits, float clip, int64_t packed, int64_t threads) {
    threads = thread_count(threads, rows, rows * length / KV_QUANTIZE_VALUES_PER_THREAD);
    kv_quantize_job jobs[MAX_THREADS];
    for (int64_t t = 0; t < threads; t++)
        jobs[t] = (kv_quantize_job){x, codes, scale, zero, rows * t / threads, rows * (t + 1) / threads, length,
                                    row_bytes, bits, packed, clip};
    return run_jobs(kv_quantize_run, jobs, sizeof jobs[0], threads);
}

/* hadamard_rows: x [batch, m] times F_1 ⊗ … ⊗ F_c, times scale. A row is the tensor
 * [o_1, …, o_c] (row-major), and x·(F_1 ⊗ … ⊗ F_c) applies each factor along its own axis:
 * y[.., j, ..] = Σ_i x[.., i, ..] F[i][j], the vectors along the later axes contiguous, so every
 * stage works in place on whole contiguous vectors (no transposes). A Sylvester factor (matrices[a]
 * NULL; F = H_2 ⊗ … ⊗ H_2 in natural order) runs as butterflies, log2(o) passes of adds and
 * subtracts (the fast Walsh–Hadamard transform) instead of o² multiply-adds; other factors (Paley)
 * as dense multiply-adds. Sums run in another order than the stage GEMMs' of the torch path:
 * results agree with them to float32 rounding. A row of m floats may be longer than the factors'
 * product: the trailing axis (H ⊗ I_inner, the cross-head transform) then rides along untouched.
 *
 * Rows go HADAMARD_LANES at a time, transposed so that the rows are the innermost axis: every
 * stage's loop then runs over inner × rows contiguous floats, which the compiler vectorizes even
 * for the last factor (inner 1). Each element sees the same operations in the same order however
 * many rows share its block or thread (no fused multiply-add: -ffp-contract=off), so a row's bits
 * do not depend on the batch or the thread count. Returns 1 on no memory or thread. */
#define HADAMARD_LANES 16
#define MAX_DENSE_ORDER 256  /* Paley factors up to this order take the tiled loop */

/* A Sylvester factor's butterflies, log2(radix) levels at a time (radix a power of two) from level
 * len: for each column chunk of one vector, the radix vectors k, k + len, …,
 * k + (radix - 1)·len stay in registers through log2(radix) levels, one load and one store each,
 * where the level-by-level loop below loads and stores every vector once per level (and, with
 * inner one vector wide, spends more on its loops than on the adds). The pairs are the level loop's
 * pairs and every element sees the same adds and subtracts in the same order: the same bits. */
#ifdef __AVX2__
#define RADIX_LEVELS(name, vec, lanes, most, load, store, add, sub)                                       \
    static inline __attribute__((always_inline)) void name(float *block, int64_t order, int64_t len,     \
                                                           int64_t inner, const int radix) {             \
        for (int64_t first = 0; first < order; first += radix * len)                                     \
            for (int64_t k = first; k < first + len; k++)                                                \
                for (int64_t i = 0; i < inner; i += lanes) {                                             \
                    float *base = block + k * inner + i;                                                 \
                    vec v[most];                                                                         \
                    _Pragma("GCC unroll 16") for (int t = 0; t < radix; t++) v[t] = load(base + t * len * inner); \
                    _Pragma("GCC unroll 4") for (int step = 1; step < radix; step *= 2)                  \
                        _Pragma("GCC unroll 16") for (int t = 0; t < radix; t++)                         \
                            if (!(t & step)) {                                                           \
                                const vec u = v[t], w = v[t + step];                                     \
                                v[t] = add(u, w);                                                        \
                                v[t + step] = sub(u, w);                                                 \
                            }                                                                            \
                    _Pragma("GCC unroll 16") for (int t = 0; t < radix; t++) store(base + t * len * inner, v[t]); \
                }                                                                                        \
    }
#ifdef __AVX512F__
#define YMM_RADIX 16  /* 32 vector registers */
RADIX_LEVELS(radix_levels_16, __m512, 16, 16, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_add_ps, _mm512_sub_ps)
#else
#define YMM_RADIX 8  /* AVX2 has 16 vector registers */
#endif
RADIX_LEVELS(radix_levels_8, __m256, 8, YMM_RADIX, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_add_ps, _mm256_sub_ps)

/* Every level of a Sylvester factor whose inner axis is whole vectors, `most` levels' worth of
 * vectors (radix) per pass. */
#define ALL_LEVELS(levels, most)                                                                         \
    while (len < order) {                                                                                \
        const int64_t radix = order / len < most ? order / len : most;                                   \
        switch (radix) { /* a constant radix: the vectors live in registers */                           \
            case 2: levels(block, order, len, inner, 2); break;                                          \
            case 4: levels(block, order, len, inner, 4); break;                                          \
            case 8: levels(block, order, len, inner, 8); break;                                          \
            default: levels(block, order, len, inner, most); break;                                      \
        }                                                                                                \
        len *= radix;                                                                                    \
    }
#endif

#ifdef __AVX2__
/* Levels 1, 2 and 4 of contiguous floats (inner 1: a decode step's last factor) inside each aligned
 * 8-float chunk: a lane's partner comes from a permute, u + v and u - v from one add and one
 * subtract, a blend keeps each lane's own (the level loop's operations, so the same bits). */
static void chunk_levels(float *block, int64_t order) {
    for (int64_t c = 0; c < order; c += 8) {
        __m256 x = _mm256_loadu_ps(block + c), s;
        s = _mm256_permute_ps(x, 0xB1);  /* partners 1 apart */
        x = _mm256_blend_ps(_mm256_add_ps(x, s), _mm256_sub_ps(s, x), 0xAA);
        s = _mm256_permute_ps(x, 0x4E);  /* 2 apart */
        x = _mm256_blend_ps(_mm256_add_ps(x, s), _mm256_sub_ps(s, x), 0xCC);
        s = _mm256_permute2f128_ps(x, x, 0x01);  /* 4 apart */
        x = _mm256_blend_ps(_mm256_add_ps(x, s), _mm256_sub_ps(s, x), 0xF0);
        _mm256_storeu_ps(block + c, x);
    }
}
#endif

static void butterflies(float *block, int64_t order, int64_t inner) {
    int64_t len = 1;
#ifdef __AVX2__
    if (inner == 1 && order >= 8) {  /* the later levels pair whole chunks: 8 floats as the inner axis */
        chunk_levels(block, order);
        butterflies(block, order / 8, 8);
        return;
    }
#endif
#ifdef __AVX512F__
    if (inner % 16 == 0) {
        ALL_LEVELS(radix_levels_16, 16)
        return;
    }
#endif
#ifdef __AVX2__
    if (inner % 8 == 0) {
        ALL_LEVELS(radix_levels_8, YMM_RADIX)
        return;
    }
#endif
    for (; len < order; len *= 2)
        for (int64_t first = 0; first < order; first += 2 * len)
            for (int64_t k = first; k < first + len; k++) {
                float *a = block + k * inner, *b = block + (k + len) * inner;
                for (int64_t i = 0; i < inner; i++) {
                    const float u = a[i], v = b[i];
                    a[i] = u + v;
                    b[i] = u - v;
                }
            }
}

/* One output vector of a dense factor for `width` (<= HADAMARD_LANES) columns: out[i] = sum over k
 * in order of h[k][j] · tile[k][i], from 0.0f, a multiply then an add (the plain loop's sequence
 * for each element, whatever the width: the same bits), in the widest vectors that fit; the
 * outputs dense_columns4 leaves (widths other than 16 and 8, or fewer than four outputs left). */
static void dense_columns(const float *tile, const float *h, int64_t order, int64_t j, int64_t width, float *out) {
    int64_t i = 0;
#ifdef __AVX2__
    for (; i + 8 <= width; i += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t k = 0; k < order; k++)
            acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(h[k * order + j]),
                                                   _mm256_loadu_ps(tile + k * HADAMARD_LANES + i)));
        _mm256_storeu_ps(out + i, acc);
    }
    for (; i + 4 <= width; i += 4) {
        __m128 acc = _mm_setzero_ps();
        for (int64_t k = 0; k < order; k++)
            acc = _mm_add_ps(acc, _mm_mul_ps(_mm_set1_ps(h[k * order + j]), _mm_loadu_ps(tile + k * HADAMARD_LANES + i)));
        _mm_storeu_ps(out + i, acc);
    }
#endif
    for (; i < width; i++) {
        float acc = 0.0f;
        for (int64_t k = 0; k < order; k++) acc += h[k * order + j] * tile[k * HADAMARD_LANES + i];
        out[i] = acc;
    }
}

/* `width` (<= HADAMARD_LANES) floats from src to dst: vector moves where memcpy of a size only
 * known at run time became a string move that cost more than the dense factor's arithmetic. */
static inline void copy_columns(float *dst, const float *src, int64_t width) {
    int64_t i = 0;
#ifdef __AVX2__
    for (; i + 8 <= width; i += 8) _mm256_storeu_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
    for (; i < width; i++) dst[i] = src[i];
}

/* dense_columns for outputs j..j+3 together, where the width is 16 or 8 columns: four independent
 * sums per input vector (one sum's adds wait on each other; four keep the adder busy). The same
 * operations per element as dense_columns: the same bits. Returns 0 where it does not apply. */
static int dense_columns4(const float *tile, const float *h, int64_t order, int64_t j, int64_t width, float *out,
                          int64_t inner) {
#if defined(__AVX512F__)
    if (width == 16) {
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t k = 0; k < order; k++) {
            const __m512 x = _mm512_loadu_ps(tile + k * HADAMARD_LANES);
            for (int t = 0; t < 4; t++) acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_set1_ps(h[k * order + j + t]), x));
        }
        for (int t = 0; t < 4; t++) _mm512_storeu_ps(out + t * inner, acc[t]);
        return 1;
    }
#endif
#ifdef __AVX2__
    if (width == 16 || width == 8) {
        const int halves = (int)(width / 8);
        __m256 acc[4][2];
        for (int t = 0; t < 4; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        for (int64_t k = 0; k < order; k++)
            for (int c = 0; c < halves; c++) {
                const __m256 x = _mm256_loadu_ps(tile + k * HADAMARD_LANES + 8 * c);
                for (int t = 0; t < 4; t++)
                    acc[t][c] = _mm256_add_ps(acc[t][c], _mm256_mul_ps(_mm256_set1_ps(h[k * order + j + t]), x));
            }
        for (int t = 0; t < 4; t++)
            for (int c = 0; c < halves; c++) _mm256_storeu_ps(out + t * inner + 8 * c, acc[t][c]);
        return 1;
    }
#endif
    (void)tile; (void)h; (void)order; (void)j; (void)width; (void)out; (void)inner;
    return 0;
}

/* Each output sums its order products in k order from 0.0f (dense_columns), HADAMARD_LANES columns
 * at a time: their inputs copied into one small tile first (the column's vectors lie inner floats
 * apart, often a multiple of 4 KiB, where the L1 cache keeps few, and the outputs then go straight
 * back into the block), the sums in registers, each output stored once. A factor above
 * MAX_DENSE_ORDER goes through `scratch` instead. */
static void dense_axis(float *block, float *scratch, const float *h, int64_t order, int64_t inner) {
    if (order <= MAX_DENSE_ORDER) {
        float tile[MAX_DENSE_ORDER * HADAMARD_LANES];
        for (int64_t i0 = 0; i0 < inner; i0 += HADAMARD_LANES) {
            const int64_t width = inner - i0 < HADAMARD_LANES ? inner - i0 : HADAMARD_LANES;
            for (int64_t k = 0; k < order; k++) copy_columns(tile + k * HADAMARD_LANES, block + k * inner + i0, width);
            int64_t j = 0;
            for (; j + 4 <= order && dense_columns4(tile, h, order, j, width, block + j * inner + i0, inner); j += 4) {}
            for (; j < order; j++) dense_columns(tile, h, order, j, width, block + j * inner + i0);
        }
        return;
    }
    for (int64_t j = 0; j < order; j++) {
        float *o = scratch + j * inner;
        for (int64_t i = 0; i < inner; i++) o[i] = 0.0f;
        for (int64_t k = 0; k < order; k++) {
            const float f = h[k * order + j];
            const float *in = block + k * inner;
            for (int64_t i = 0; i < inner; i++) o[i] += f * in[i];
        }
    }
    memcpy(block, scratch, sizeof(float) * (size_t)(order * inner));
}

/* A whole block of rows with m a multiple of 8 moves between the row layout and the lanes layout in
 * 8 × 8 tiles transposed in registers (the element-by-element loops below gather one float at a
 * time); the moves and the final multiply by scale are the same operations, so the same bits. */
static int64_t lanes_transposable(int64_t r, int64_t m) {
#ifdef __AVX2__
    return r == HADAMARD_LANES && m % 8 == 0;
#else
    (void)r; (void)m;
    return 0;
#endif
}

#ifdef __AVX2__
static inline void transpose8(__m256 *v) {
    const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
    const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    v[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    v[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    v[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    v[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    v[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    v[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    v[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    v[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

static void lanes_in(const float *x, float *work, int64_t m) {  /* work[i][b] = x[b][i] */
    __m256 v[8];
    for (int64_t b = 0; b < HADAMARD_LANES; b += 8)
        for (int64_t i = 0; i < m; i += 8) {
            for (int64_t k = 0; k < 8; k++) v[k] = _mm256_loadu_ps(x + (b + k) * m + i);
            transpose8(v);
            for (int64_t k = 0; k < 8; k++) _mm256_storeu_ps(work + (i + k) * HADAMARD_LANES + b, v[k]);
        }
}

static void lanes_out(const float *work, float *out, int64_t m, float scale) {  /* out[b][i] = work[i][b] * scale */
    const __m256 s = _mm256_set1_ps(scale);
    __m256 v[8];
    for (int64_t b = 0; b < HADAMARD_LANES; b += 8)
        for (int64_t i = 0; i < m; i += 8) {
            for (int64_t k = 0; k < 8; k++) v[k] = _mm256_loadu_ps(work + (i + k) * HADAMARD_LANES + b);
            transpose8(v);
            for (int64_t k = 0; k < 8; k++) _mm256_storeu_ps(out + (b + k) * m + i, _mm256_mul_ps(v[k], s));
        }
}
#else
static void lanes_in(const float *x, float *work, int64_t m) { (void)x; (void)work; (void)m; }
static void lanes_out(const float *work, float *out, int64_t m, float scale) { (void)work; (void)out; (void)m; (void)scale; }
#endif

typedef struct { const float *x; float *out; int64_t m, stages; const int64_t *orders; const float *const *matrices;
                 float scale; int64_t first, last;
                 int8_t *codes; float *row_scales; float divisor, qmax; int *nonfinite; } hadamard_job;

#ifdef __AVX2__
/* lanes_out for a block's codes (integer-valued floats in [-128, 127]): out[b][i] = (int8) work[i][b]. */
static void lanes_codes_out(const float *work, int8_t *out, int64_t m) {
    __m256 v[8];
    for (int64_t b = 0; b < HADAMARD_LANES; b += 8)
        for (int64_t i = 0; i < m; i += 8) {
            for (int64_t k = 0; k < 8; k++) v[k] = _mm256_loadu_ps(work + (i + k) * HADAMARD_LANES + b);
            transpose8(v);
            for (int64_t k = 0; k < 8; k++) {
                const __m256i c = _mm256_cvtps_epi32(v[k]);
                const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
                _mm_storel_epi64((__m128i *)(out + (b + k) * m + i), _mm_packs_epi16(words, words));
            }
        }
}
#endif

/* quantize_per_token of a transformed block, still in the lanes layout (work[i * r + b], r rows):
 * y = work · scale (lanes_out's multiply), each row's step max|y| / divisor (1 where 0), its codes
 * round(y / step) half to even, clamped to [-qmax - 1, qmax]: numerics.quant.activation_codes'
 * operations on the float rows hadamard_rows would return, so the same codes and scales, with
 * neither the float rows nor a second pass over them in memory. Returns 0, or 1 (nothing
 * reliable written) where a value is not finite: the caller's reference then decides. */
static int quantize_lanes(float *work, int64_t r, int64_t m, float scale, float divisor, float qmax, int8_t *codes,
                          float *row_scales, int fast) {
    (void)fast;
    float top[HADAMARD_LANES] = {0}, step[HADAMARD_LANES];
    int64_t i = 0;
#ifdef __AVX2__
    if (fast) {  /* r == HADAMARD_LANES: two 8-lane halves of rows */
        const __m256 sign = _mm256_set1_ps(-0.0f), by = _mm256_set1_ps(scale);
        __m256 most[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, bad = _mm256_setzero_ps();
        for (; i < m; i++)
            for (int h = 0; h < 2; h++) {
                float *at = work + i * HADAMARD_LANES + 8 * h;
                const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(at), by);
                _mm256_storeu_ps(at, y);
                bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(y, y), _mm256_setzero_ps(), _CMP_NEQ_UQ));
                most[h] = _mm256_max_ps(most[h], _mm256_andnot_ps(sign, y));
            }
        if (_mm256_movemask_ps(bad)) return 1;
        _mm256_storeu_ps(top, most[0]);
        _mm256_storeu_ps(top + 8, most[1]);
    }
#endif
#ifdef __AVX2__
    if (r == 1 && !fast) {  /* one row (a decode step's): its values 8 at a time */
        const __m256 sign = _mm256_set1_ps(-0.0f), by = _mm256_set1_ps(scale);
        __m256 most = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        for (; i + 8 <= m; i += 8) {
            const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(work + i), by);
            _mm256_storeu_ps(work + i, y);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(y, y), _mm256_setzero_ps(), _CMP_NEQ_UQ));
            most = _mm256_max_ps(most, _mm256_andnot_ps(sign, y));
        }
        if (_mm256_movemask_ps(bad)) return 1;
        float lanes[8];
        _mm256_storeu_ps(lanes, most);
        for (int c = 0; c < 8; c++) top[0] = lanes[c] > top[0] ? lanes[c] : top[0];
    }
#endif
    for (; i < m; i++)
        for (int64_t b = 0; b < r; b++) {
            const float y = work[i * r + b] * scale, a = fabsf(y);
            if (!isfinite(y)) return 1;
            work[i * r + b] = y;
            top[b] = a > top[b] ? a : top[b];
        }
    for (int64_t b = 0; b < r; b++) {
        const float s = top[b] / divisor;
        step[b] = s == 0.0f ? 1.0f : s;
        row_scales[b] = step[b];
    }
    const float low = -qmax - 1.0f;
#ifdef __AVX2__
    if (fast) {
        const __m256 lo = _mm256_set1_ps(low), hi = _mm256_set1_ps(qmax);
        const __m256 steps[2] = {_mm256_loadu_ps(step), _mm256_loadu_ps(step + 8)};
        for (int64_t k = 0; k < m; k++)
            for (int h = 0; h < 2; h++) {
                float *at = work + k * HADAMARD_LANES + 8 * h;
                const __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(at), steps[h]),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                _mm256_storeu_ps(at, _mm256_min_ps(_mm256_max_ps(q, lo), hi));
            }
        lanes_codes_out(work, codes, m);
        return 0;
    }
#endif
    int64_t k = 0;
#ifdef __AVX2__
    if (r == 1) {
        const __m256 lo = _mm256_set1_ps(low), hi = _mm256_set1_ps(qmax), by = _mm256_set1_ps(step[0]);
        for (; k + 8 <= m; k += 8) {
            const __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(work + k), by),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m256i c = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, lo), hi));
            const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
            _mm_storel_epi64((__m128i *)(codes + k), _mm_packs_epi16(words, words));
        }
    }
#endif
    for (; k < m; k++)
        for (int64_t b = 0; b < r; b++) {
            float q = nearbyintf(work[k * r + b] / step[b]);
            q = q < low ? low : (q > qmax ? qmax : q);
            codes[b * m + k] = (int8_t)q;
        }
    return 0;
}

static void *hadamard_run(void *arg) {  /* rows first..last of a job, a block of lanes at a time */
    const hadamard_job *j = arg;
    const int64_t m = j->m;
    /* a block's rows, no more (a decode step's row: 2m floats, not an mmap of 32m) */
    const int64_t lanes = j->last - j->first < HADAMARD_LANES ? j->last - j->first : HADAMARD_LANES;
    float *work = malloc(sizeof(float) * (size_t)(2 * m * (lanes > 0 ? lanes : 1)));
    if (!work) return arg;
    float *scratch = work + m * lanes;
    for (int64_t row = j->first; row < j->last; row += HADAMARD_LANES) {
        const int64_t r = j->last - row < HADAMARD_LANES ? j->last - row : HADAMARD_LANES;
        const float *x = j->x + row * m;
        float *out = j->out ? j->out + row * m : NULL;
        const int64_t fast = lanes_transposable(r, m);
        if (fast) lanes_in(x, work, m);
        else if (r == 1) memcpy(work, x, sizeof(float) * (size_t)m);  /* one row is its own lanes layout */
        else
            for (int64_t i = 0; i < m; i++)
                for (int64_t b = 0; b < r; b++) work[i * r + b] = x[b * m + i];
        int64_t outer = 1;
        for (int64_t a = 0; a < j->stages; a++) {
            const int64_t order = j->orders[a], inner = m / outer / order * r;
            for (int64_t o = 0; o < outer; o++) {
                float *block = work + o * order * inner;
                if (j->matrices[a]) dense_axis(block, scratch, j->matrices[a], order, inner);
                else butterflies(block, order, inner);
            }
            outer *= order;
        }
        if (j->codes) {
            if (quantize_lanes(work, r, m, j->scale, j->divisor, j->qmax, j->codes + row * m, j->row_scales + row, fast)) {
                __atomic_store_n(j->nonfinite, 1, __ATOMIC_RELAXED);
                break;
            }
        } else if (fast) lanes_out(work, out, m, j->scale);
        else if (r == 1)
            for (int64_t i = 0; i < m; i++) out[i] = work[i] * j->scale;
        else
            for (int64_t b = 0; b < r; b++)
                for (int64_t i = 0; i < m; i++) out[b * m + i] = work[i * r + b] * j->scale;
    }
    free(work);
    return NULL;
}

/* The rows split over `threads` threads in whole blocks, at least HADAMARD_WORK_PER_THREAD floats
 * each (starting a thread costs more than a small transform; a thread that cannot start leaves its
 * share to the caller's). */
#define HADAMARD_WORK_PER_THREAD (1LL << 18)

static int hadamard_jobs(const float *x, float *out, int64_t batch, int64_t m, int64_t stages, const int64_t *orders,
                         const float *const *matrices, float scale, int8_t *codes, float *row_scales, float divisor,
                         float qmax, int *nonfinite, int64_t threads) {
    const int64_t blocks = (batch + HADAMARD_LANES - 1) / HADAMARD_LANES;
    threads = thread_count(threads, blocks, 1 + batch * m / HADAMARD_WORK_PER_THREAD);
    hadamard_job jobs[MAX_THREADS];
    for (int64_t t = 0; t < threads; t++) {
        const int64_t first = blocks * t / threads * HADAMARD_LANES, last = blocks * (t + 1) / threads * HADAMARD_LANES;
        jobs[t] = (hadamard_job){x, out, m, stages, orders, matrices, scale, first, last < batch ? last : batch,
                                 codes, row_scales, divisor, qmax, nonfinite};
    }
    return run_jobs(hadamard_run, jobs, sizeof jobs[0], threads);
}

int hadamard_rows(const float *x, float *out, int64_t batch, int64_t m, int64_t stages, const int64_t *orders,
                  const float *const *matrices, float scale, int64_t threads) {
    return hadamard_jobs(x, out, batch, m, stages, orders, matrices, scale, NULL, NULL, 1.0f, 0.0f, NULL, threads);
}

/* hadamard_codes: hadamard_rows, then quantize_per_token of each transformed row (bits-bit codes,
 * step max|y| / divisor) while the block is in the cache (quantize_lanes): int8 codes [batch, m] and
 * scales [batch], the same bits as the two ops one after the other. A prefill's online Hadamards
 * feed 4-bit linears: the float rows were written out, then read twice by the quantizer. Returns 1
 * on no memory or thread, 2 if a value is not finite (the caller's reference decides those). */
int hadamard_codes(const float *x, int8_t *codes, float *row_scales, int64_t batch, int64_t m, int64_t stages,
                   const int64_t *orders, const float *const *matrices, float scale, int64_t bits, float divisor,
                   int64_t threads) {
    int nonfinite = 0;
    const float qmax = (float)((1 << (bits - 1)) - 1);
    const int failed = hadamard_jobs(x, NULL, batch, m, stages, orders, matrices, scale, codes, row_scales, divisor,
                                     qmax, &nonfinite, threads);
    return failed ? 1 : nonfinite ? 2 : 0;
}

/* int8_weight_linear: y [rows, n] = (x · wᵀ) * scale[n] (+ b[n]) for float32 x [rows, k] and
 * int8 weights [n, k] with one scale per output channel: the 8-bit output head at decode, which
 * reads a quarter of a float32 head's bytes. Each dot product sums in float32 in a fixed order
 * (8 or 16 lanes, then the lanes in order), so a result does not depend on the thread count.
 * Threads split the output channels (a thread that cannot start leaves its share to the caller's). */
typedef struct { const float *x; const int8_t *w; const float *scale; const float *b; float *y;
                 int64_t rows, k, n, first, last; } int8_job;

static float dot_int8(const float *x, const int8_t *w, int64_t k) {
    /* 8 lanes, each summing every 8th product in order, then the lanes in order, then the tail:
     * the same order on every instruction set (native.py's int8_linear_reference repeats it). */
    float lanes[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}, total = 0.0f;
    int64_t i = 0;
#ifdef __AVX2__
    __m256 sum = _mm256_setzero_ps();
    for (; i + 8 <= k; i += 8) {
        const __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + i))));
        sum = _mm256_add_ps(sum, _mm256_mul_ps(_mm256_loadu_ps(x + i), wf));
    }
    _mm256_storeu_ps(lanes, sum);
#else
    for (; i + 8 <= k; i += 8)
        for (int j = 0; j < 8; j++) lanes[j] += x[i + j] * (float)w[i + j];
#endif
    for (int j = 0; j < 8; j++) total += lanes[j];
    for (; i < k; i++) total += x[i] * (float)w[i];
    return total;
}

#ifdef __AVX2__
/* dot_int8 for four consecutive channels at once: each channel's lanes add the same products in
 * the same order (the same bits), but four independent chains hide the adds' latency, which one
 * channel at a time waits on; and the weight rows GEMV_PREFETCH_ROWS ahead are fetched early. */
static void dot_int8_x4(const float *x, const int8_t *w, int64_t k, int prefetch, float out[4]) {
    __m256 sum[4];
    for (int c = 0; c < 4; c++) sum[c] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i);
        for (int c = 0; c < 4; c++) {
            const int8_t *row = w + c * k + i;
            if (prefetch && (i & 63) == 0) _mm_prefetch((const char *)(row + GEMV_PREFETCH_ROWS * k), _MM_HINT_T0);
            const __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)row)));
            sum[c] = _mm256_add_ps(sum[c], _mm256_mul_ps(xv, wf));
        }
    }
    for (int c = 0; c < 4; c++) {
        float lanes[8], total = 0.0f;
        _mm256_storeu_ps(lanes, sum[c]);
        for (int j = 0; j < 8; j++) total += lanes[j];
        for (int64_t t = i; t < k; t++) total += x[t] * (float)w[c * k + t];
        out[c] = total;
    }
}
#endif

static void *int8_run(void *arg) {
    const int8_job *job = arg;
    int64_t n = job->first;
#ifdef __AVX2__
    for (; n + 4 <= job->last; n += 4)
        for (int64_t r = 0; r < job->rows; r++) {
            float dots[4];
            dot_int8_x4(job->x + r * job->k, job->w + n * job->k, job->k,
                        r == 0 && n + GEMV_PREFETCH_ROWS + 4 <= job->last, dots);
            for (int c = 0; c < 4; c++) {
                const float v = dots[c] * job->scale[n + c];
                job->y[r * job->n + n + c] = job->b ? v + job->b[n + c] : v;
            }
        }
#endif
    for (; n < job->last; n++)
        for (int64_t r = 0; r < job->rows; r++) {
            const float v = dot_int8(job->x + r * job->k, job->w + n * job->k, job->k) * job->scale[n];
            job->y[r * job->n + n] = job->b ? v + job->b[n] : v;
        }
    return NULL;
}
void int8_weight_linear(const float *x, const int8_t *w, const float *scale, const float *b, float *y, int64_t rows,
                       int64_t k, int64_t n, int64_t threads) {
    threads = thread_count(threads, n, MAX_THREADS);
    int8_job jobs[MAX_THREADS];
    for (int64_t t = 0; t < threads; t++)
        jobs[t] = (int8_job){x, w, scale, b, y, rows, k, n, n * t / threads, n * (t + 1) / threads};
    run_jobs(int8_run, jobs, sizeof jobs[0], threads);  /* it needs no memory: never fails */
}

/* int8_codes_linear: y [rows, n] = ((float)acc * ws[n]) * xs[r] (+ b[n]), acc = sum_k x[r][k] * w[n][k]
 * exactly in int32, for int8 activation codes x [rows, k] with one scale per row and int8 weights
 * [n, k] with one scale per channel: the output head with 8-bit activations (quantize_lm_head=
 * "w8a8"). The float head (dot_int8) converts every weight to float and is bound by those
 * conversions at 1.3-1.6 ms a decode step on a Zen 4; integer sums read the same bytes with a
 * third of the instructions or fewer. Integer sums: any order, any variant, the same bits. Threads
 * split the channels (a thread that cannot start leaves its share to the caller's). */
typedef struct { const int8_t *x; const float *xs; const int8_t *w; const float *ws; const float *b; float *y;
                 int64_t rows, k, n, first, last; } codes_job;

/* sum_k x[k] * w[k]; x_sum = sum_k x[k] (the VNNI path's correction, computed once per row) */
static int32_t dot_codes(const int8_t *x, const int8_t *w, int64_t k, int32_t x_sum) {
    int32_t total = 0;
    int64_t i = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    /* w XOR 0x80 is w + 128 as an unsigned byte, what vpdpbusd multiplies with the signed x; the
     * 128 * sum(x) this adds comes off at the end. A masked-off byte is 0 in x: it adds nothing. */
    __m512i acc = _mm512_setzero_si512();
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (; i < k; i += 64) {
        const __mmask64 live = k - i >= 64 ? ~0ULL : (1ULL << (k - i)) - 1;
        acc = _mm512_dpbusd_epi32(acc, _mm512_xor_si512(_mm512_maskz_loadu_epi8(live, w + i), flip),
                                  _mm512_maskz_loadu_epi8(live, x + i));
    }
    total = _mm512_reduce_add_epi32(acc) - 128 * x_sum;
#elif defined(__AVX2__)
    /* both widened to int16, then vpmaddwd: pairs of int16 products summed into int32, exactly */
    (void)x_sum;
    __m256i acc = _mm256_setzero_si256();
    for (; i + 16 <= k; i += 16) {
        const __m256i xv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(x + i)));
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + i)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(xv, wv));
    }
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, acc);
    for (int j = 0; j < 8; j++) total += lanes[j];
#else
    (void)x_sum;
#endif
    for (; i < k; i++) total += (int32_t)x[i] * w[i];
    return total;
}

static void *codes_run(void *arg) {
    const codes_job *job = arg;
    int32_t x_sum[MAX_ROWS];
    for (int64_t r = 0; r < job->rows; r++) {
        x_sum[r] = 0;
        for (int64_t i = 0; i < job->k; i++) x_sum[r] += job->x[r * job->k + i];
    }
    for (int64_t n = job->first; n < job->last; n++)
        for (int64_t r = 0; r < job->rows; r++)
            job->y[r * job->n + n] = epilogue(dot_codes(job->x + r * job->k, job->w + n * job->k, job->k, x_sum[r]),
                                              job->ws[n], job->xs[r], job->b, n);
    return NULL;
}

/* Rows in blocks of MAX_ROWS (a decode step sends 1; native.py sends at most FEW_ROWS = 16). */
void int8_codes_linear(const int8_t *x, const float *xs, const int8_t *w, const float *ws, const float *b, float *y,
                       int64_t rows, int64_t k, int64_t n, int64_t threads) {
    threads = thread_count(threads, n, MAX_THREADS);
    for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS) {
        const int64_t count = rows - r0 < MAX_ROWS ? rows - r0 : MAX_ROWS;
        codes_job jobs[MAX_THREADS];
        for (int64_t t = 0; t < threads; t++)
            jobs[t] = (codes_job){x + r0 * k, xs + r0, w, ws, b, y + r0 * n, count, k, n, n * t / threads,
                                  n * (t + 1) / threads};
        run_jobs(codes_run, jobs, sizeof jobs[0], threads);  /* it needs no memory: never fails */
    }
}
