/* Blockwise 4-bit quantize / dequantize on CPU: the compiled kernel behind lmlab.quant.kernels.native.
 *
 * QLoRA section 3 (Dettmers et al. 2023): a block of B values is divided by its absolute maximum and
 * each value becomes the index of the nearest codebook entry; two codes share a byte, the first in
 * the high nibble. The arithmetic is the torch fast path's in lmlab/quant/blockwise.py, step for
 * step in float32, so the codes and values are bit-identical to it (and to bitsandbytes):
 *
 *   absmax = max |x| (+0 for an all-zero block; NaN / inf when the block holds one)
 *   s = x * (1 / max(absmax, 1e-38f)); j = trunc(K + K * s); slot = low[j] + (s > mid[j])
 *   value = pair[byte] * absmax, rounded to the output dtype to nearest even
 *
 * The tables come from Python (codebooks._grid_tables, _slot_byte_to_code_byte, _pair_table), so a
 * new 4-bit format needs no change here.
 *
 * Threads: the work is cut into chunks of whole blocks that `threads` pthreads (the caller among
 * them) take from an atomic counter. A thread whose core another process holds delays only the chunk
 * it is on, and the others take the rest; there is no barrier per step as with one OpenMP region per
 * torch op. threads == 1 runs inline.
 *
 * One binary runs on every x86-64 and is fast on AVX2: the table gathers and half-float conversions
 * are written twice, in AVX2 + F16C intrinsics taken when the CPU has them (checked once per call)
 * and in plain C; target_clones builds an AVX2 and a baseline copy of the rest. Elsewhere (or with
 * -DLMLAB_NO_X86) only the plain C is built. No -ffast-math and no FMA contraction: the float32
 * steps must round exactly as torch's. A large dequantize output gets MADV_HUGEPAGE on its interior
 * and is faulted in by the worker threads, one huge page per chunk.
 *
 * The functions are called through ctypes (lmlab_quantize_4bit, lmlab_dequantize_4bit,
 * lmlab_all_finite); the module init only makes the file importable, so that setuptools builds and
 * installs it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

/* -DLMLAB_NO_X86 builds what a non-x86 machine builds (a portability check on x86). */
#if defined(__x86_64__) && defined(__GNUC__) && (!defined(__clang__) || __clang_major__ >= 14) && \
    !defined(LMLAB_NO_X86)
#define X86 1
#include <immintrin.h>
/* The loops GCC does not vectorise by itself (table gathers, half-float conversions) exist twice:
 * in AVX2 + F16C intrinsics, taken when the CPU has them, and in plain C. */
#define AVX2 __attribute__((target("avx2,f16c")))
#ifdef __linux__
#define HOT __attribute__((target_clones("avx2", "default")))
#endif
#else
#define X86 0
#endif
#ifndef HOT
#define HOT
#endif

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum { MAX_BLOCK = 4096, MAX_THREADS = 256 };
/* Output bytes per chunk: a few hundred chunks for a 4096^2 weight (32 KiB of codes = 64 Ki values),
 * so a preempted thread holds back at most one small piece. A large dequantize output is cut at its
 * 2 MiB huge pages instead. */
#define QUANT_CHUNK_BYTES ((int64_t)1 << 15)
#define DEQUANT_CHUNK_BYTES ((int64_t)1 << 18)
#define HUGEPAGE ((uintptr_t)1 << 21)

static inline uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* IEEE half -> float, exact for every input (c10's fp16_ieee_to_fp32_value, branch-free). */
static inline float half_to_float(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = u2f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
    return u2f(sign | (two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized)));
}

/* float -> IEEE half, round to nearest even with subnormals and overflow to inf: the same bits as
 * torch's float32 -> float16 copy (c10's fp16_ieee_from_fp32_value; the F16C instruction agrees). */
static inline uint16_t float_to_half(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f2u(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = u2f((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f2u(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* float -> bfloat16, round to nearest even (c10's round_to_nearest_even; NaN stays NaN). */
static inline uint16_t float_to_bf16(float f) {
    const uint32_t u = f2u(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* ------------------------------------------------------------------------------------------------ */
/* A pool of pthreads over an atomic chunk counter                                                  */
/* ------------------------------------------------------------------------------------------------ */

typedef struct job {
    void (*run)(const struct job *, int64_t first_block, int64_t end_block);
    int64_t blocks, first_blocks, blocks_per_chunk, chunks;
    int avx2; /* the CPU runs the AVX2 + F16C loops */
    atomic_llong next;
    /* quantize */
    const void *w;
    int dtype;
    int64_t block_size;
    int64_t k;
    const float *low, *mid;
    const uint8_t *byte_map;
    uint8_t *packed;
    float *absmax;
    /* dequantize */
    const uint8_t *codes;
    const float *scales;
    const float *pairs;
    void *out;
} job_t;

static int cpu_has_avx2(void);

/* Chunk c holds blocks [start(c), start(c + 1)): the first chunk has `first_blocks`, the others
 * `blocks_per_chunk` each. */
static int64_t chunk_start(const job_t *job, int64_t c) {
    const int64_t b = c == 0 ? 0 : job->first_blocks + (c - 1) * job->blocks_per_chunk;
    return b < job->blocks ? b : job->blocks;
}

static void *work(void *arg) {
    job_t *job = arg;
    for (;;) {
        const int64_t c = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
        if (c >= job->chunks) return NULL;
        job->run(job, chunk_start(job, c), chunk_start(job, c + 1));
    }
}

/* Cut the blocks into chunks of about `chunk_bytes` of output whose cuts fall on multiples of
 * `chunk_bytes` from address 0 (so on huge-page boundaries for 2 MiB chunks: two threads never
 * fault the same huge page in, which makes the kernel zero it twice), then run them. */
static void run_job(job_t *job, uintptr_t out, int64_t out_block_bytes, int64_t chunk_bytes, int threads,
                    int plain) {
    int64_t per = chunk_bytes / out_block_bytes;
    job->blocks_per_chunk = per > 0 ? per : 1;
    const int64_t to_cut = (int64_t)(((out + chunk_bytes - 1) & ~(uintptr_t)(chunk_bytes - 1)) - out);
    job->first_blocks = to_cut / out_block_bytes > 0 ? to_cut / out_block_bytes : job->blocks_per_chunk;
    if (job->first_blocks > job->blocks) job->first_blocks = job->blocks;
    job->chunks = 1 + (job->blocks - job->first_blocks + job->blocks_per_chunk - 1) / job->blocks_per_chunk;
    atomic_init(&job->next, 0);
    job->avx2 = !plain && cpu_has_avx2();
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > job->chunks) threads = (int)job->chunks;
    pthread_t tid[MAX_THREADS];
    int started = 0;
    for (int i = 1; i < threads; i++)
        if (pthread_create(&tid[started], NULL, work, job) == 0) started++;
    /* The caller works too; where a thread cannot be created, the others take its chunks. Joining
     * blocks rather than spins, so an idle core can pick up a preempted worker. */
    work(job);
    for (int i = 0; i < started; i++) pthread_join(tid[i], NULL);
}

/* A fresh multi-megabyte output is otherwise faulted in 4 KiB at a time, which costs more than
 * decoding it; transparent huge pages on its 2 MiB-aligned interior are only advice. */
static void advise_hugepages(void *ptr, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (nbytes < ((size_t)8 << 20)) return;
    const uintptr_t start = ((uintptr_t)ptr + HUGEPAGE - 1) & ~(HUGEPAGE - 1);
    const uintptr_t end = ((uintptr_t)ptr + nbytes) & ~(HUGEPAGE - 1);
    if (end > start) madvise((void *)start, end - start, MADV_HUGEPAGE);
#else
    (void)ptr;
    (void)nbytes;
#endif
}

/* ------------------------------------------------------------------------------------------------ */
/* Quantize                                                                                         */
/* ------------------------------------------------------------------------------------------------ */

/* max |x| over the block, on the bits: |x| orders as its bit pattern, NaN above inf. */
static inline uint32_t abs_bits_max(const float *x, int64_t n) {
    uint32_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t a = f2u(x[i]) & 0x7FFFFFFFu;
        m = a > m ? a : m;
    }
    return m;
}

static inline void widen_bf16(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = u2f((uint32_t)src[i] << 16);
}

static inline void widen_f16(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = half_to_float(src[i]);
}

/* Sorted slot 0..15 of each scaled value, exactly as the torch fast path computes it. */
static inline void slots_of(const float *x, int64_t n, float recip, float kf, int32_t jmax, const float *low,
                            const float *mid, int32_t *slot) {
    for (int64_t i = 0; i < n; i++) {
        const float s = x[i] * recip;
        const float g = kf + kf * s; /* K = 2^j: K * s is exact, one rounding as in torch's add */
        int32_t j = (int32_t)g;      /* truncation toward zero, as torch's float -> int64 copy */
        j = j < 0 ? 0 : (j > jmax ? jmax : j);
        slot[i] = (int32_t)low[j] + (s > mid[j]);
    }
}

#if X86
#define ABS_BITS_MAX abs_bits_max_avx2
#define SLOTS slots_avx2
#define PACK pack_avx2
#define WIDEN_F16 widen_f16_avx2
#define NARROW_F16 narrow_f16_avx2

static int cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}
#else
#define ABS_BITS_MAX abs_bits_max
#define SLOTS slots_of
#define PACK pack_slots
#define WIDEN_F16 widen_f16
#define NARROW_F16 narrow_f16

static int cpu_has_avx2(void) { return 0; }
#endif

#if X86
AVX2 static uint32_t abs_bits_max_avx2(const float *x, int64_t n) {
    const __m256i mask = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i m = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), mask));
    uint32_t lanes[8], r = 0;
    _mm256_storeu_si256((__m256i *)lanes, m);
    for (int l = 0; l < 8; l++) r = lanes[l] > r ? lanes[l] : r;
    for (; i < n; i++) {
        const uint32_t a = f2u(x[i]) & 0x7FFFFFFFu;
        r = a > r ? a : r;
    }
    return r;
}

AVX2 static void slots_avx2(const float *x, int64_t n, float recip, float kf, int32_t jmax, const float *low,
                            const float *mid, int32_t *slot) {
    const __m256 vr = _mm256_set1_ps(recip), vk = _mm256_set1_ps(kf);
    const __m256i lo = _mm256_setzero_si256(), hi = _mm256_set1_epi32(jmax);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(x + i), vr);
        const __m256 g = _mm256_add_ps(vk, _mm256_mul_ps(vk, s));
        const __m256i j = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvttps_epi32(g), lo), hi);
        const __m256i below = _mm256_cvttps_epi32(_mm256_i32gather_ps(low, j, 4));
        const __m256 above = _mm256_cmp_ps(s, _mm256_i32gather_ps(mid, j, 4), _CMP_GT_OQ);
        /* a true comparison is all ones, -1 as an integer */
        _mm256_storeu_si256((__m256i *)(slot + i), _mm256_sub_epi32(below, _mm256_castps_si256(above)));
    }
    slots_of(x + i, n - i, recip, kf, jmax, low, mid, slot + i);
}

AVX2 static void pack_avx2(const int32_t *slot, int64_t n, const uint8_t *byte_map, uint8_t *dst) {
    for (int64_t i = 0; i < n / 2; i++) dst[i] = (uint8_t)(slot[2 * i] << 4 | slot[2 * i + 1]);
    if (byte_map != NULL)
        for (int64_t i = 0; i < n / 2; i++) dst[i] = byte_map[dst[i]];
}

AVX2 static void widen_f16_avx2(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

AVX2 static void narrow_f16_avx2(const float *src, int64_t n, uint16_t *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++) dst[i] = float_to_half(src[i]);
}
#endif

static inline void pack_slots(const int32_t *slot, int64_t n, const uint8_t *byte_map, uint8_t *dst) {
    if (byte_map == NULL) {
        for (int64_t i = 0; i < n / 2; i++) dst[i] = (uint8_t)(slot[2 * i] << 4 | slot[2 * i + 1]);
    } else {
        for (int64_t i = 0; i < n / 2; i++) dst[i] = byte_map[slot[2 * i] << 4 | slot[2 * i + 1]];
    }
}

HOT static void quantize_blocks(const job_t *job, int64_t b0, int64_t b1) {
    const int64_t bs = job->block_size;
    const float kf = (float)job->k;
    const float tiny = (float)1e-38; /* torch's clamp(min=1e-38): the double rounded to float32 */
    const int fast = job->avx2;
    float buf[MAX_BLOCK];
    int32_t slot[MAX_BLOCK];
    for (int64_t b = b0; b < b1; b++) {
        const float *x;
        if (job->dtype == DT_F32) {
            x = (const float *)job->w + b * bs;
        } else {
            const uint16_t *src = (const uint16_t *)job->w + b * bs;
            if (job->dtype == DT_BF16)
                widen_bf16(src, buf, bs);
            else if (fast)
                WIDEN_F16(src, buf, bs);
            else
                widen_f16(src, buf, bs);
            x = buf;
        }
        const uint32_t m = fast ? ABS_BITS_MAX(x, bs) : abs_bits_max(x, bs);
        uint8_t *dst = job->packed + b * bs / 2;
        if (m >= 0x7F800000u) { /* inf, or NaN (one canonical NaN): the caller refuses the weight */
            job->absmax[b] = m == 0x7F800000u ? INFINITY : NAN;
            memset(dst, 0, (size_t)(bs / 2));
            continue;
        }
        const float a = u2f(m);
        job->absmax[b] = a;
        const float recip = 1.0f / (a > tiny ? a : tiny);
        if (fast) {
            SLOTS(x, bs, recip, kf, (int32_t)(2 * job->k), job->low, job->mid, slot);
            PACK(slot, bs, job->byte_map, dst);
        } else {
            slots_of(x, bs, recip, kf, (int32_t)(2 * job->k), job->low, job->mid, slot);
            pack_slots(slot, bs, job->byte_map, dst);
        }
    }
}

/* Returns 0 on success, -1 on arguments it does not take (nothing written then). plain = 1 runs the
 * plain-C loops even where the CPU has AVX2 (the tests hold both to the same bits). */
int lmlab_quantize_4bit(const void *w, int dtype, int64_t blocks, int64_t block_size, int64_t k,
                        const float *low, const float *mid, const uint8_t *byte_map, uint8_t *packed,
                        float *absmax, int threads, int plain) {
    if (!w || !low || !mid || !packed || !absmax || blocks < 0 || block_size < 2 || block_size % 2 ||
        block_size > MAX_BLOCK || k < 1 || k > (1 << 20) || (dtype != DT_F32 && dtype != DT_F16 && dtype != DT_BF16))
        return -1;
    if (blocks == 0) return 0;
    job_t job = {0};
    job.run = quantize_blocks;
    job.blocks = blocks;
    job.block_size = block_size;
    job.w = w;
    job.dtype = dtype;
    job.k = k;
    job.low = low;
    job.mid = mid;
    job.byte_map = byte_map;
    job.packed = packed;
    job.absmax = absmax;
    run_job(&job, (uintptr_t)packed, block_size / 2, QUANT_CHUNK_BYTES, threads, plain);
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Dequantize                                                                                       */
/* ------------------------------------------------------------------------------------------------ */

static inline void decode_f32(const uint8_t *src, int64_t nbytes, const float *pairs, float a, float *dst) {
    for (int64_t i = 0; i < nbytes; i++) {
        const float *p = pairs + 2 * src[i];
        dst[2 * i] = p[0] * a;
        dst[2 * i + 1] = p[1] * a;
    }
}

static inline void narrow_bf16(const float *src, int64_t n, uint16_t *dst) {
    for (int64_t i = 0; i < n; i++) dst[i] = float_to_bf16(src[i]);
}

static inline void narrow_f16(const float *src, int64_t n, uint16_t *dst) {
    for (int64_t i = 0; i < n; i++) dst[i] = float_to_half(src[i]);
}

HOT static void dequantize_blocks(const job_t *job, int64_t b0, int64_t b1) {
    const int64_t bs = job->block_size;
    float buf[MAX_BLOCK];
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *src = job->codes + b * bs / 2;
        const float a = job->scales[b];
        if (job->dtype == DT_F32) {
            decode_f32(src, bs / 2, job->pairs, a, (float *)job->out + b * bs);
            continue;
        }
        decode_f32(src, bs / 2, job->pairs, a, buf);
        uint16_t *dst = (uint16_t *)job->out + b * bs;
        if (job->dtype == DT_BF16)
            narrow_bf16(buf, bs, dst);
        else if (job->avx2)
            NARROW_F16(buf, bs, dst);
        else
            narrow_f16(buf, bs, dst);
    }
}

int lmlab_dequantize_4bit(const uint8_t *packed, const float *absmax, const float *pairs, int64_t blocks,
                          int64_t block_size, int dtype, void *out, int threads, int plain) {
    if (!packed || !absmax || !pairs || !out || blocks < 0 || block_size < 2 || block_size % 2 ||
        block_size > MAX_BLOCK || (dtype != DT_F32 && dtype != DT_F16 && dtype != DT_BF16))
        return -1;
    if (blocks == 0) return 0;
    advise_hugepages(out, (size_t)(blocks * block_size) * (dtype == DT_F32 ? 4 : 2));
    job_t job = {0};
    job.run = dequantize_blocks;
    job.blocks = blocks;
    job.block_size = block_size;
    job.codes = packed;
    job.scales = absmax;
    job.pairs = pairs;
    job.dtype = dtype;
    job.out = out;
    const int64_t esize = dtype == DT_F32 ? 4 : 2;
    const int64_t chunk = blocks * block_size * esize >= ((int64_t)8 << 20) ? (int64_t)HUGEPAGE : DEQUANT_CHUNK_BYTES;
    run_job(&job, (uintptr_t)out, block_size * esize, chunk, threads, plain);
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Finiteness of the scales, on one thread                                                          */
/* ------------------------------------------------------------------------------------------------ */

/* 1 if every value is finite, else 0. The caller refuses a weight whose absmax holds a NaN or inf;
 * a torch reduction would be two more OpenMP regions, which stall when another process holds a core. */
HOT int lmlab_all_finite(const float *x, int64_t n) {
    uint32_t worst = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t a = f2u(x[i]) & 0x7FFFFFFFu;
        worst = a > worst ? a : worst;
    }
    return worst < 0x7F800000u;
}

/* ------------------------------------------------------------------------------------------------ */
/* Importable as lmlab.quant.kernels._cpu4bit, so that setuptools builds and installs it in place.  */
/* ------------------------------------------------------------------------------------------------ */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_cpu4bit",
    .m_doc = "Compiled CPU 4-bit kernel; called through ctypes by native.py.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__cpu4bit(void) { return PyModule_Create(&module); }
