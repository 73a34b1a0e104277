/* lmlab's LLM.int8() CPU kernel (int8_cpu.py): the int8 product as an int16 x int8 GEMM with exact int32 sums,
 * and the passes around it, one memory pass each.
 *
 * lmlab_int8_row_codes: per row of x (M, K) float32, the absmax, the codes round(x * (127 / absmax)) (round half
 * to even, as torch.round) as integer-valued float32 and/or int16, the row scale, the L1 norm of the codes (the
 * float32 GEMM's exactness bound past K = 1024, int8_cpu._fits_float32), the largest absmax and, on request,
 * every column's max |x| (LLM.int8()'s outlier columns).  The row is read once from memory: the second read
 * (the codes) finds it in L1/L2.  The arithmetic is lmlab.quant.int8.row_codes': factor = (1 / absmax) * 127 in
 * float32 as torch evaluates 127 / scale (0 for an all-zero row), one float32 multiply, one rounding; so the
 * codes and scales are bit-identical to it.  A row whose absmax is not finite (NaN, inf) or whose factor
 * overflows (absmax < 127 / FLT_MAX) makes the call return 1 and the caller takes the torch path.
 *
 * lmlab_int8_gemm: out = the exact product of the int16 codes and the int8 weight (vpmaddwd: 16 products summed
 * pairwise into int32 lanes per instruction, the construction of oneDNN's and FBGEMM's int8 GEMMs on CPUs without
 * VNNI), dequantized (and the bias added) in the register tile's store.
 *
 * lmlab_int8_rescale: acc (M, N) *= sx[i] then *= wsk[j], in place: dequantize_product_'s two float32
 * multiplies in the same order, one pass instead of two (the float32-GEMM route).
 *
 * Work is split over `threads` threads (ctypes releases the GIL); small inputs stay on the caller's thread.
 * Built with -fopenmp (setup.py), the threads are torch's own OpenMP pool (the process has one libgomp):
 * pthreads of our own fought torch's spinning workers for the cores, and the whole int8 MiniLM forward took
 * 340-390 ms at 2 threads against 210-245 ms this way (float32: 145-155 ms). Without OpenMP, pthreads.
 * No -ffast-math and no FMA contraction: every step must round as torch's does.
 */
#include <Python.h>

#include <float.h>
#include <math.h>
#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) && defined(__GNUC__) && (!defined(__clang__) || __clang_major__ >= 14) && \
    !defined(LMLAB_NO_X86)
#define X86 1
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2")))
#else
#define X86 0
#endif

#define MIN_PER_THREAD (1 << 15) /* elements: below this a thread costs more than it saves */
#define MAX_THREADS 64

typedef struct {
    const float *x;
    float *codes, *scale, *l1;
    int16_t *codes16;
    const int16_t *a16;
    const int8_t *w8;
    const float *sx, *wsk, *bias;
    float *acc;
    int32_t *acc32; /* lmlab_int8_gemm without scales: the int32 product itself */
    int64_t k, n, m, row0, row1;
    int bad;
    float top;                 /* max of the part's row absmax */
    float *colmax;             /* the part's column maxima of |x| (NULL: not wanted) */
    atomic_llong *next;        /* lmlab_int8_gemm: the next chunk of weight rows to take */
    int64_t chunk, chunks;     /* weight rows per chunk (a multiple of NR), chunk count */
} job_t;

/* max |x| of a row and whether it holds a NaN or inf; colmax (if not NULL) takes the column maxima of |x|. */
static float absmax_scalar(const float *x, int64_t k, int *bad, float *colmax) {
    float m = 0.0f;
    for (int64_t i = 0; i < k; i++) {
        const float a = fabsf(x[i]);
        if (!(a <= FLT_MAX)) *bad = 1;
        if (a > m) m = a;
        if (colmax && a > colmax[i]) colmax[i] = a;
    }
    return m;
}

static float codes_scalar(const float *x, int64_t k, float factor, float *c) {
    float l1 = 0.0f; /* a sum of integers below 2**24: exact */
    for (int64_t i = 0; i < k; i++) {
        const float v = nearbyintf(x[i] * factor);
        c[i] = v;
        l1 += fabsf(v);
    }
    return l1;
}

#if X86
static int have_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return cached;
}

AVX2 static float absmax_avx2(const float *x, int64_t k, int *bad, float *colmax) {
    const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(FLT_MAX);
    __m256 m = _mm256_setzero_ps(), ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
        ok = _mm256_and_ps(ok, _mm256_cmp_ps(a, big, _CMP_LE_OQ)); /* false for NaN and inf */
        m = _mm256_max_ps(m, a);
        if (colmax) _mm256_storeu_ps(colmax + i, _mm256_max_ps(_mm256_loadu_ps(colmax + i), a));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    float r = 0.0f;
    for (int j = 0; j < 8; j++) r = lanes[j] > r ? lanes[j] : r;
    if (_mm256_movemask_ps(ok) != 0xff) *bad = 1;
    const float tail = absmax_scalar(x + i, k - i, bad, colmax ? colmax + i : NULL);
    return tail > r ? tail : r;
}

AVX2 static float codes_avx2(const float *x, int64_t k, float factor, float *c) {
    const __m256 f = _mm256_set1_ps(factor), sign = _mm256_set1_ps(-0.0f);
    __m256 s = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), f),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_ps(c + i, v);
        s = _mm256_add_ps(s, _mm256_andnot_ps(sign, v));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, s);
    float l1 = 0.0f;
    for (int j = 0; j < 8; j++) l1 += lanes[j];
    return l1 + codes_scalar(x + i, k - i, factor, c + i);
}
#endif

#if X86
/* The codes as int16 only (no float32 copy), same values: round(x * factor) converted exactly. */
AVX2 static float codes16_avx2(const float *x, int64_t k, float factor, int16_t *c16) {
    const __m256 f = _mm256_set1_ps(factor), sign = _mm256_set1_ps(-0.0f);
    __m256 s = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), f),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256i q = _mm256_cvtps_epi32(v);
        _mm_storeu_si128((__m128i *)(c16 + i),
                         _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
        s = _mm256_add_ps(s, _mm256_andnot_ps(sign, v));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, s);
    float l1 = 0.0f;
    for (int j = 0; j < 8; j++) l1 += lanes[j];
    for (; i < k; i++) {
        const float v = nearbyintf(x[i] * factor);
        c16[i] = (int16_t)v;
        l1 += fabsf(v);
    }
    return l1;
}
#endif

static void *codes_rows(void *arg) {
    job_t *j = arg;
#if X86
    const int avx2 = have_avx2();
#endif
    for (int64_t r = j->row0; r < j->row1 && !j->bad; r++) {
        const float *x = j->x + r * j->k;
        float *c = j->codes ? j->codes + r * j->k : NULL; /* NULL: int16 codes only (AVX2) */
        int bad = 0;
        float m;
#if X86
        m = avx2 ? absmax_avx2(x, j->k, &bad, j->colmax) : absmax_scalar(x, j->k, &bad, j->colmax);
#else
        m = absmax_scalar(x, j->k, &bad, j->colmax);
#endif
        /* torch evaluates 127 / scale as reciprocal(scale) * 127: two roundings, kept here */
        const float factor = m == 0.0f ? 0.0f : (1.0f / m) * 127.0f;
        if (bad || isinf(factor)) {
            j->bad = 1;
            break;
        }
#if X86
        if (!c && avx2) { /* int16 codes only */
            j->l1[r] = codes16_avx2(x, j->k, factor, j->codes16 + r * j->k);
            j->scale[r] = m;
            if (m > j->top) j->top = m;
            continue;
        }
        j->l1[r] = avx2 ? codes_avx2(x, j->k, factor, c) : codes_scalar(x, j->k, factor, c);
#else
        j->l1[r] = codes_scalar(x, j->k, factor, c);
#endif
        j->scale[r] = m;
        if (m > j->top) j->top = m;
        if (j->codes16)
            for (int64_t i = 0; i < j->k; i++) j->codes16[r * j->k + i] = (int16_t)c[i]; /* exact: |c| <= 127 */
    }
    return NULL;
}

#if X86 && defined(__linux__)
__attribute__((target_clones("avx2", "default")))
#endif
static void *rescale_rows(void *arg) {
    job_t *j = arg;
    for (int64_t r = j->row0; r < j->row1; r++) {
        float *a = j->acc + r * j->n;
        const float s = j->sx[r];
        const float *w = j->wsk;
        for (int64_t i = 0; i < j->n; i++) a[i] = (a[i] * s) * w[i]; /* GCC vectorises this */
    }
    return NULL;
}

/* Runs fn over rows [0, m) in up to `threads` contiguous parts; returns the OR of the parts' bad flags. */
static int run_rows(void *(*fn)(void *), job_t proto, int64_t m, int64_t width, int threads, float *top) {
    int64_t parts = (m * width) / MIN_PER_THREAD;
    if (parts > threads) parts = threads;
    if (parts > m) parts = m;
    if (parts > MAX_THREADS) parts = MAX_THREADS;
    if (parts < 1) parts = 1;
    job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t p = 0; p < parts; p++) {
        jobs[p] = proto;
        jobs[p].row0 = m * p / parts;
        jobs[p].row1 = m * (p + 1) / parts;
        jobs[p].bad = 0;
        jobs[p].top = 0.0f;
        if (proto.colmax && p > 0) {
            jobs[p].colmax = calloc((size_t)width, sizeof(float));
            if (!jobs[p].colmax) jobs[p].bad = 1; /* no memory: the caller takes the torch path */
        }
    }
#ifdef _OPENMP
    (void)tid, (void)started;
    /* torch's own OpenMP pool (the same libgomp is loaded): no thread fights torch's spinning workers */
#pragma omp parallel num_threads((int)parts)
    {
        int nt = omp_get_num_threads();
        for (int64_t p = omp_get_thread_num(); p < parts; p += nt)
            if (!jobs[p].bad) fn(&jobs[p]);
    }
#else
    for (int64_t p = 1; p < parts; p++)
        started[p] = !jobs[p].bad && pthread_create(&tid[p], NULL, fn, &jobs[p]) == 0;
    fn(&jobs[0]);
    for (int64_t p = 1; p < parts; p++) {
        if (started[p])
            pthread_join(tid[p], NULL);
        else if (!jobs[p].bad)
            fn(&jobs[p]); /* no thread to be had: this one does the part */
    }
#endif
    int bad = 0;
    for (int64_t p = 0; p < parts; p++) {
        bad |= jobs[p].bad;
        if (jobs[p].top > proto.top) proto.top = jobs[p].top;
        if (proto.colmax && p > 0 && jobs[p].colmax) {
            for (int64_t i = 0; i < width; i++)
                if (jobs[p].colmax[i] > proto.colmax[i]) proto.colmax[i] = jobs[p].colmax[i];
            free(jobs[p].colmax);
        }
    }
    if (top) *top = proto.top;
    return bad;
}

int lmlab_int8_row_codes(const float *x, int64_t m, int64_t k, float *codes, float *scale, float *l1,
                         int16_t *codes16, float *top, float *colmax, int threads) {
#if X86
    if (!codes && (!codes16 || !have_avx2())) return 1;
#else
    if (!codes) return 1;
#endif
    job_t proto = {.x = x, .codes = codes, .scale = scale, .l1 = l1, .codes16 = codes16, .colmax = colmax, .k = k};
    return run_rows(codes_rows, proto, m, k, threads, top);
}

int lmlab_int8_rescale(float *acc, int64_t m, int64_t n, const float *sx, const float *wsk, int threads) {
    job_t proto = {.acc = acc, .sx = sx, .wsk = wsk, .n = n};
    return run_rows(rescale_rows, proto, m, n, threads, NULL);
}


/* ---- the int8 product itself: int16 codes x int8 weights, int32 sums (vpmaddwd), exact for K < 2**17 ----
 * out[i, j] = ((float)sum_k a[i, k] * w[j, k] * sx[i]) * wsk[j]: the exact int32 product converted (round to
 * nearest, as int32.float()), then dequantize_product_'s two multiplies; so the layer output is bit-identical
 * to the float32 GEMM route's.  A tile of MR activation rows x NR weight rows keeps MR * NR accumulators in
 * registers; the activation rows of a row block stay in L2 while every weight row streams past them. */
#if X86
#ifndef MR
#define MR 4
#endif
#ifndef NR
#define NR 2
#endif
#ifndef ROW_BLOCK
#define ROW_BLOCK 64
#endif

AVX2 static inline int32_t hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

__attribute__((always_inline)) AVX2 static inline void tile(const int16_t *a, const int8_t *w, int64_t k, int mr,
                                                             int nr, int32_t out[MR][NR]) {
    __m256i acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_si256();
    int64_t p = 0;
    for (; p + 16 <= k; p += 16) {
        __m256i wv[NR];
        for (int j = 0; j < nr; j++) wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j * k + p)));
        for (int i = 0; i < mr; i++) {
            const __m256i av = _mm256_loadu_si256((const __m256i *)(a + i * k + p));
            for (int j = 0; j < nr; j++) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(av, wv[j]));
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            int32_t s = hsum(acc[i][j]);
            for (int64_t q = p; q < k; q++) s += (int32_t)a[i * k + q] * (int32_t)w[j * k + q];
            out[i][j] = s;
        }
}


#if MR == 4 && NR == 2
/* The full 4 x 2 tile: the eight int32 sums reduced together (hadd tree), converted and rescaled as a vector. */
AVX2 static inline void tile_full(const int16_t *a, const int8_t *w, int64_t k, const float *sx, const float *wsk,
                                  const float *bias, float *out, int64_t n) {
    __m256i v[8];
    for (int i = 0; i < 8; i++) v[i] = _mm256_setzero_si256();
    int64_t p = 0;
    for (; p + 16 <= k; p += 16) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + p)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k + p)));
        for (int i = 0; i < 4; i++) {
            const __m256i av = _mm256_loadu_si256((const __m256i *)(a + i * k + p));
            v[2 * i] = _mm256_add_epi32(v[2 * i], _mm256_madd_epi16(av, w0));
            v[2 * i + 1] = _mm256_add_epi32(v[2 * i + 1], _mm256_madd_epi16(av, w1));
        }
    }
    const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
    int32_t t[8];
    _mm256_storeu_si256((__m256i *)t, sums);
    for (int64_t q = p; q < k; q++) /* K tail, not a multiple of 16 */
        for (int i = 0; i < 4; i++) {
            t[2 * i] += (int32_t)a[i * k + q] * (int32_t)w[q];
            t[2 * i + 1] += (int32_t)a[i * k + q] * (int32_t)w[k + q];
        }
    sums = _mm256_loadu_si256((const __m256i *)t);
    const __m256 sxv = _mm256_setr_ps(sx[0], sx[0], sx[1], sx[1], sx[2], sx[2], sx[3], sx[3]);
    const __m256 wv = _mm256_setr_ps(wsk[0], wsk[1], wsk[0], wsk[1], wsk[0], wsk[1], wsk[0], wsk[1]);
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sums), sxv), wv);
    if (bias) y = _mm256_add_ps(y, _mm256_setr_ps(bias[0], bias[1], bias[0], bias[1], bias[0], bias[1], bias[0], bias[1]));
    float f[8];
    _mm256_storeu_ps(f, y);
    for (int i = 0; i < 4; i++) {
        out[i * n] = f[2 * i];
        out[i * n + 1] = f[2 * i + 1];
    }
}
#endif

AVX2 static void gemm_part(const job_t *jb) {
    const int64_t k = jb->k, n = jb->n;
    int32_t t[MR][NR];
    for (int64_t r0 = 0; r0 < jb->m; r0 += ROW_BLOCK) {
        const int64_t r1 = r0 + ROW_BLOCK < jb->m ? r0 + ROW_BLOCK : jb->m;
        for (int64_t c = jb->row0; c < jb->row1;) {
            const int nr = jb->row1 - c >= NR ? NR : 1;
            for (int64_t r = r0; r < r1; r += MR) {
                const int mr = r1 - r >= MR ? MR : (int)(r1 - r);
                const int16_t *a = jb->a16 + r * k;
                const int8_t *w = jb->w8 + c * k;
                /* constant tile shapes, so that the compiler unrolls the register tile */
#if MR == 4 && NR == 2
                if (mr == MR && nr == NR && !jb->acc32) {
                    tile_full(a, w, k, jb->sx + r, jb->wsk + c, jb->bias ? jb->bias + c : NULL, jb->acc + r * n + c, n);
                    continue;
                }
#endif
                if (mr == MR && nr == NR)
                    tile(a, w, k, MR, NR, t);
                else if (mr == MR)
                    tile(a, w, k, MR, 1, t);
                else if (nr == NR)
                    for (int i = 0; i < mr; i++) {
                        int32_t u[MR][NR];
                        tile(a + i * k, w, k, 1, NR, u);
                        for (int j = 0; j < NR; j++) t[i][j] = u[0][j];
                    }
                else
                    for (int i = 0; i < mr; i++) {
                        int32_t u[MR][NR];
                        tile(a + i * k, w, k, 1, 1, u);
                        t[i][0] = u[0][0];
                    }
                for (int i = 0; i < mr; i++)
                    for (int j = 0; j < nr; j++) {
                        if (jb->acc32)
                            jb->acc32[(r + i) * n + c + j] = t[i][j];
                        else {
                            float y = ((float)t[i][j] * jb->sx[r + i]) * jb->wsk[c + j];
                            if (jb->bias) y += jb->bias[c + j];
                            jb->acc[(r + i) * n + c + j] = y;
                        }
                    }
            }
            c += nr;
        }
    }
}

/* Takes chunks of weight rows from the shared counter until none is left: a thread whose core another
 * process holds delays only its current chunk. */
static void *gemm_cols(void *arg) {
    const job_t *proto = arg;
    job_t j = *proto;
    for (;;) {
        const int64_t c = atomic_fetch_add_explicit(proto->next, 1, memory_order_relaxed);
        if (c >= proto->chunks) break;
        j.row0 = c * proto->chunk;
        j.row1 = j.row0 + proto->chunk < proto->n ? j.row0 + proto->chunk : proto->n;
        gemm_part(&j);
    }
    return NULL;
}
#endif

/* out (M, N) float32 = the rescaled exact product of a16 (M, K) int16 (|a| <= 128) and w8 (N, K) int8, plus
 * bias[j] where bias is not NULL (one float32 add after the two multiplies, as `out + bias` rounds), or,
 * where sx is NULL, out (M, N) int32 = the product itself; returns 1 (nothing written) where it cannot run:
 * no AVX2, or K past the int32 bound (K * 128 * 128 < 2**31). Weight rows are split over threads. */
int lmlab_int8_gemm(const int16_t *a16, const int8_t *w8, int64_t m, int64_t n, int64_t k, const float *sx,
                    const float *wsk, const float *bias, void *out, int threads) {
#if X86
    if (!have_avx2() || k >= (1 << 17)) return 1;
    job_t proto = {.a16 = a16, .w8 = w8, .sx = sx, .wsk = wsk, .bias = bias, .m = m, .n = n, .k = k};
    if (sx)
        proto.acc = out;
    else
        proto.acc32 = out;
    /* threads only where each gets at least 2**21 products; chunks of weight rows, 8 per thread */
    int64_t parts = (m * n * k) / (MIN_PER_THREAD * 64);
    if (parts > threads) parts = threads;
    if (parts > n / NR) parts = n / NR;
    if (parts > MAX_THREADS) parts = MAX_THREADS;
    if (parts < 1) parts = 1;
    int64_t chunk = parts == 1 ? n : (n + 8 * parts - 1) / (8 * parts);
    chunk = (chunk + NR - 1) / NR * NR;
    if (chunk < NR) chunk = NR;
    atomic_llong next = 0;
    proto.next = &next;
    proto.chunk = chunk;
    proto.chunks = (n + chunk - 1) / chunk;
#ifdef _OPENMP
#pragma omp parallel num_threads((int)parts)
    gemm_cols(&proto); /* every thread of torch's pool takes chunks from the shared counter */
#else
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t p = 1; p < parts; p++) started[p] = pthread_create(&tid[p], NULL, gemm_cols, &proto) == 0;
    gemm_cols(&proto); /* the calling thread takes chunks too, and all of them if no thread started */
    for (int64_t p = 1; p < parts; p++)
        if (started[p]) pthread_join(tid[p], NULL);
#endif
    return 0;
#else
    (void)a16, (void)w8, (void)m, (void)n, (void)k, (void)sx, (void)wsk, (void)bias, (void)out, (void)threads;
    return 1;
#endif
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_cpu8bit",
    .m_doc = "Compiled passes around lmlab's LLM.int8() CPU GEMM; called through ctypes by int8_cpu.py.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__cpu8bit(void) { return PyModule_Create(&module); }
