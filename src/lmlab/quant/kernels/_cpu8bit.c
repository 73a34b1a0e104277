/* The passes around the float32 GEMM of lmlab's LLM.int8() CPU kernel (int8_cpu.py), one memory pass each.
 *
 * lmlab_int8_row_codes: per row of x (M, K) float32, the absmax, the codes round(x * (127 / absmax)) as
 * integer-valued float32 (round half to even, as torch.round), the row scale and the L1 norm of the codes
 * (the exactness bound of the float32 GEMM past K = 1024, int8_cpu._fits_float32).  The row is read once
 * from memory: the second read (the codes) finds it in L1/L2.  The arithmetic is lmlab.quant.int8.row_codes':
 * factor = (1 / absmax) * 127 in float32 as torch evaluates
 * 127 / scale (0 for an all-zero row), one float32 multiply, one rounding; so the
 * codes and scales are bit-identical to it.  A row whose absmax is not finite (NaN, inf) or whose factor
 * overflows (absmax < 127 / FLT_MAX) makes the call return 1 and the caller takes the torch path.
 *
 * lmlab_int8_rescale: acc (M, N) *= sx[i] then *= wsk[j], in place: dequantize_product_'s two float32
 * multiplies in the same order, one pass instead of two.
 *
 * Rows are split over `threads` pthreads (ctypes releases the GIL); small inputs stay on the caller's thread.
 * No -ffast-math and no FMA contraction: every step must round as torch's does.
 */
#include <Python.h>

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>

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
    const float *sx, *wsk;
    float *acc;
    int64_t k, n, row0, row1;
    int bad;
} job_t;

/* max |x| of a row and whether it holds a NaN or inf. */
static float absmax_scalar(const float *x, int64_t k, int *bad) {
    float m = 0.0f;
    for (int64_t i = 0; i < k; i++) {
        const float a = fabsf(x[i]);
        if (!(a <= FLT_MAX)) *bad = 1;
        if (a > m) m = a;
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

AVX2 static float absmax_avx2(const float *x, int64_t k, int *bad) {
    const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(FLT_MAX);
    __m256 m = _mm256_setzero_ps(), ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
        ok = _mm256_and_ps(ok, _mm256_cmp_ps(a, big, _CMP_LE_OQ)); /* false for NaN and inf */
        m = _mm256_max_ps(m, a);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    float r = 0.0f;
    for (int j = 0; j < 8; j++) r = lanes[j] > r ? lanes[j] : r;
    if (_mm256_movemask_ps(ok) != 0xff) *bad = 1;
    const float tail = absmax_scalar(x + i, k - i, bad);
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

static void *codes_rows(void *arg) {
    job_t *j = arg;
#if X86
    const int avx2 = have_avx2();
#endif
    for (int64_t r = j->row0; r < j->row1 && !j->bad; r++) {
        const float *x = j->x + r * j->k;
        float *c = j->codes + r * j->k;
        int bad = 0;
        float m;
#if X86
        m = avx2 ? absmax_avx2(x, j->k, &bad) : absmax_scalar(x, j->k, &bad);
#else
        m = absmax_scalar(x, j->k, &bad);
#endif
        /* torch evaluates 127 / scale as reciprocal(scale) * 127: two roundings, kept here */
        const float factor = m == 0.0f ? 0.0f : (1.0f / m) * 127.0f;
        if (bad || isinf(factor)) {
            j->bad = 1;
            break;
        }
#if X86
        j->l1[r] = avx2 ? codes_avx2(x, j->k, factor, c) : codes_scalar(x, j->k, factor, c);
#else
        j->l1[r] = codes_scalar(x, j->k, factor, c);
#endif
        j->scale[r] = m;
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
static int run_rows(void *(*fn)(void *), job_t proto, int64_t m, int64_t width, int threads) {
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
    }
    for (int64_t p = 1; p < parts; p++) started[p] = pthread_create(&tid[p], NULL, fn, &jobs[p]) == 0;
    fn(&jobs[0]);
    for (int64_t p = 1; p < parts; p++) {
        if (started[p])
            pthread_join(tid[p], NULL);
        else
            fn(&jobs[p]); /* no thread to be had: this one does the part */
    }
    int bad = 0;
    for (int64_t p = 0; p < parts; p++) bad |= jobs[p].bad;
    return bad;
}

int lmlab_int8_row_codes(const float *x, int64_t m, int64_t k, float *codes, float *scale, float *l1,
                         int threads) {
    job_t proto = {.x = x, .codes = codes, .scale = scale, .l1 = l1, .k = k};
    return run_rows(codes_rows, proto, m, k, threads);
}

int lmlab_int8_rescale(float *acc, int64_t m, int64_t n, const float *sx, const float *wsk, int threads) {
    job_t proto = {.acc = acc, .sx = sx, .wsk = wsk, .n = n};
    return run_rows(rescale_rows, proto, m, n, threads);
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_cpu8bit",
    .m_doc = "Compiled passes around lmlab's LLM.int8() CPU GEMM; called through ctypes by int8_cpu.py.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__cpu8bit(void) { return PyModule_Create(&module); }
