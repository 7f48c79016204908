/* krasis native CPU decode kernels: fused MoE experts, dense projections and attention decode,
 * reading the artifact's weights in place (pointers into the mmap). Plain C + OpenMP; no Python or
 * torch headers, loaded with ctypes (krasis_run/kernels/native/__init__.py).
 *
 * Activations going into q4/q8 weights are quantized on the fly to int8 in groups of 32 (scale
 * amax/127); integer dot products per group, fp32 accumulation. bf16 and f32 weights take fp32
 * activations. Instruction paths: scalar (portable C), AVX2+FMA, AVX-512 (VL/BW/VNNI), chosen at
 * run time from the CPU flags, or forced with krs_set_isa. */
#define _GNU_SOURCE
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define KRS_X86 1
#endif

#ifndef KRS_SOURCE_HASH
#define KRS_SOURCE_HASH "dev"
#endif

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
/* q4 comes in two groupings (formats/KRS.md): a scale and zero per 32 columns (CODEC_Q4) or per 64
 * (CODEC_Q4_G64). The activations stay in groups of 32 either way; a kernel takes gsh = log2(weight
 * group / 32) and reads the scale of activation group g at g >> gsh. */
enum { CODEC_BF16 = 1, CODEC_Q8 = 2, CODEC_Q4 = 3, CODEC_F32 = 4, CODEC_Q4_G64 = 5 };
static inline int is_q4(int codec) { return codec == CODEC_Q4 || codec == CODEC_Q4_G64; }
static inline int q4_shift(int codec) { return codec == CODEC_Q4_G64; }
/* the codecs whose kernels take the activations as int8 groups */
static inline int int8_input(int codec) { return codec == CODEC_Q8 || is_q4(codec); }

typedef struct {
    int K, Kp, G;   /* length, padded to 32, groups */
    int8_t *q;      /* [Kp] quantized values, zero padded */
    float *d;       /* [G] scale per group */
    int32_t *qs;    /* [G] sum of q per group */
    float *fs;      /* [G] float sum of x per group (q4 zero term) */
    float *c8;      /* [G] -8 * d * qs (q4 offset term) */
    float *dp;      /* [G] d in the lane order of the AVX2 q4-rows kernel */
    int8_t *r;      /* [G2 * 32] q4 rows order: per group pair even cols g, g+1, odd cols g, g+1 */
} XQ;

static inline float bf16f(uint16_t v) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;
    return c.f;
}

static inline size_t xq_bytes(int K) {
    int Kp = (K + 31) / 32 * 32, G = Kp / 32, G2 = (G + 1) / 2 * 2;
    return (size_t)Kp + (size_t)G * 4 * 5 + (size_t)G2 * 32 + 64 * 4;
}

static void xq_init(XQ *x, int K, void *mem) {
    char *p = (char *)mem;
    x->K = K;
    x->Kp = (K + 31) / 32 * 32;
    x->G = x->Kp / 32;
    int G2 = (x->G + 1) / 2 * 2;
    x->d = (float *)p; p += (size_t)x->G * 4;
    x->qs = (int32_t *)p; p += (size_t)x->G * 4;
    x->fs = (float *)p; p += (size_t)x->G * 4;
    x->c8 = (float *)p; p += (size_t)x->G * 4;
    x->dp = (float *)p; p += (size_t)x->G * 4;
    p = (char *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
    x->q = (int8_t *)p; p += x->Kp;
    p = (char *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
    x->r = (int8_t *)p;
    (void)G2;
}

/* Per-thread scratch that outlives a call: decode makes ~15 kernel calls per layer, and a malloc/free
 * of the activation buffers in each (large ones are mmap'ed and page-faulted anew every time) costs
 * more than the small kernels themselves. Slot 0 is the calling thread's arena for one call's
 * buffers; slot 1 is per OpenMP worker (attention scores); slot 2 holds krs_decode_layers' buffers
 * across the kernel calls it makes (which use slot 0). Thread-specific (not global) so calls from
 * several host threads at once stay safe; freed by the key destructor when a thread exits. A
 * thread keeps the largest block it has needed (tens of MB after a 2048-token CPU prefill chunk). */
enum { SCRATCH_CALL = 0, SCRATCH_WORKER = 1, SCRATCH_STEP = 2, SCRATCH_SLOTS = 3 };
typedef struct {
    void *p;
    size_t cap;
} Scratch;
static pthread_key_t g_scratch_key;
static pthread_once_t g_scratch_once = PTHREAD_ONCE_INIT;

static void scratch_release(void *v) {
    Scratch *s = (Scratch *)v;
    for (int i = 0; i < SCRATCH_SLOTS; i++) free(s[i].p);
    free(s);
}

static void scratch_key_init(void) { pthread_key_create(&g_scratch_key, scratch_release); }

/* at least `bytes` of 64-byte aligned memory, valid until the next scratch() of this slot on this thread */
static void *scratch(int slot, size_t bytes) {
    pthread_once(&g_scratch_once, scratch_key_init);
    Scratch *s = (Scratch *)pthread_getspecific(g_scratch_key);
    if (!s) {
        s = (Scratch *)calloc(SCRATCH_SLOTS, sizeof(Scratch));
        if (!s || pthread_setspecific(g_scratch_key, s)) { free(s); return NULL; }
    }
    if (s[slot].cap < bytes) {
        size_t cap = (bytes + bytes / 4 + 4095) / 4096 * 4096; /* some headroom: KV length grows per token */
        free(s[slot].p);
        s[slot].p = aligned_alloc(64, cap);
        s[slot].cap = s[slot].p ? cap : 0;
    }
    return s[slot].p;
}

/* Carves one call's buffers out of a scratch block: a first pass with base NULL sums the sizes. */
typedef struct {
    char *base;
    size_t off;
} Carve;

static void *carve(Carve *c, size_t bytes) {
    size_t at = (c->off + 63) / 64 * 64;
    c->off = at + bytes;
    return c->base ? c->base + at : NULL;
}

/* quantize x[0..n) (n <= 32) into group g of xq */
static void xq_group(XQ *x, int g, const float *v, int n) {
    float amax = 0.f, s = 0.f;
    for (int i = 0; i < n; i++) {
        float a = fabsf(v[i]);
        amax = a > amax ? a : amax;
        s += v[i];
    }
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    int8_t *q = x->q + 32 * g;
    for (int i = 0; i < 32; i++) {
        int t = i < n ? (int)lrintf(v[i] * inv) : 0;
        t = t > 127 ? 127 : (t < -127 ? -127 : t);
        q[i] = (int8_t)t;
        sum += t;
    }
    x->d[g] = amax / 127.f;
    x->qs[g] = sum;
    x->fs[g] = s;
    x->c8[g] = -8.f * x->d[g] * (float)sum;
}

static void xq_finish(XQ *x, int q4rows) {
    static const int perm[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    int G8 = x->G / 8 * 8;
    for (int g = 0; g < G8; g += 8)
        for (int i = 0; i < 8; i++) x->dp[g + i] = x->d[g + perm[i]];
    for (int g = G8; g < x->G; g++) x->dp[g] = x->d[g];
    if (!q4rows) return;
    for (int g = 0; g + 1 < x->G; g += 2) {
        int8_t *o = x->r + 32 * g;
        const int8_t *a = x->q + 32 * g, *b = a + 32;
        for (int j = 0; j < 16; j++) {
            o[j] = a[2 * j];
            o[16 + j] = b[2 * j];
            o[32 + j] = a[2 * j + 1];
            o[48 + j] = b[2 * j + 1];
        }
    }
}

static void xq_group32(XQ *x, int g, const float *v) { xq_group(x, g, v, 32); }

typedef void (*xq32_fn)(XQ *, int, const float *);

/* full groups by `group32` (the instruction set's), a partial last group by the portable xq_group */
static void xq_quantize(XQ *x, const float *v, int q4rows, xq32_fn group32) {
    for (int g = 0; g < x->G; g++) {
        int n = x->K - 32 * g;
        if (n >= 32) group32(x, g, v + 32 * g);
        else xq_group(x, g, v + 32 * g, n);
    }
    xq_finish(x, q4rows);
}

/* ---------------------------------------------------------------- kernels per instruction set */

typedef void (*q4b_fn)(const uint8_t *, const uint16_t *, int, int, int, int, const XQ *, float *);
typedef void (*q8_fn)(const int8_t *, const uint16_t *, int, int, int, const XQ *, float *);
typedef void (*q4r_fn)(const uint8_t *, const uint16_t *, const uint16_t *, int, int, int, int, const XQ *,
                       float *);
typedef void (*bf16_fn)(const uint16_t *, int, int, int, const float *, float *);
typedef void (*f32_fn)(const float *, int, int, int, const float *, float *);
typedef void (*attn_fn)(const float *, int, int, const uint16_t *, const uint16_t *, int, int, int, float, float *,
                        float *, float *, float *);
typedef void (*rms_fn)(const float *, const float *, int, float, float *);
typedef void (*nrope_fn)(const float *, const float *, int, float, const float *, const float *, float *);
typedef void (*addrms_fn)(float *, const float *, const float *, int, float, float *);
typedef uint64_t (*xor_fn)(const uint64_t *, size_t);

typedef struct {
    q4b_fn q4b;
    q8_fn q8;
    q4r_fn q4r;
    bf16_fn bf16;
    f32_fn f32;
    attn_fn attn;
    rms_fn rms;
    nrope_fn nrope;
    addrms_fn addrms;
    xq32_fn xq32;
    xor_fn xorw;
} Kernels;

#define FN(name) name##_scalar
#include "generic.inc"
#undef FN

#ifdef KRS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FN(name) name##_avx2gen
#include "generic.inc"
#undef FN
#define FN(name) name##_avx2
#include "avx2.inc"
#undef FN
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define KRS_VNNI 1
#define FN(name) name##_avx512gen
#include "generic.inc"
#undef FN
#define FN(name) name##_avx512
#include "avx2.inc"
#undef FN
#undef KRS_VNNI
#pragma GCC pop_options
#endif

static Kernels KERNELS[3];
static int g_isa = -1, g_best = 0, g_threads = 1;

static int detect_isa(void) {
#ifdef KRS_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
    return ISA_SCALAR;
}

static void init(void) {
    if (g_isa >= 0) return;
    KERNELS[0] = (Kernels){q4b_block_scalar, q8_rows_scalar, q4r_rows_scalar, bf16_rows_scalar, f32_rows_scalar,
                           attn_part_scalar, rms_row_scalar, norm_rope_head_scalar, add_rms_row_scalar, xq_group32,
                           xor_words_scalar};
#ifdef KRS_X86
    KERNELS[1] = (Kernels){q4b_block_avx2, q8_rows_avx2, q4r_rows_avx2, bf16_rows_avx2, f32_rows_avx2gen,
                           attn_part_avx2, rms_row_avx2gen, norm_rope_head_avx2gen, add_rms_row_avx2gen,
                           xq_group32_avx2, xor_words_avx2gen};
    KERNELS[2] = (Kernels){q4b_block_avx512, q8_rows_avx512, q4r_rows_avx512, bf16_rows_avx512,
                           f32_rows_avx512gen, attn_part_avx512, rms_row_avx512gen, norm_rope_head_avx512gen,
                           add_rms_row_avx512gen, xq_group32_avx512, xor_words_avx512gen};
#else
    KERNELS[1] = KERNELS[2] = KERNELS[0];
#endif
    g_best = detect_isa();
    g_isa = g_best;
    g_threads = omp_get_max_threads();
}

/* ---------------------------------------------------------------- exported API */

const char *krs_source_hash(void) { return KRS_SOURCE_HASH; }

int krs_best_isa(void) {
    init();
    return g_best;
}

int krs_get_isa(void) {
    init();
    return g_isa;
}

/* returns the ISA in use; refuses (returns -1) one this CPU cannot run */
int krs_set_isa(int isa) {
    init();
    if (isa < 0 || isa > g_best) return -1;
    g_isa = isa;
    return g_isa;
}

void krs_set_threads(int n) {
    init();
    g_threads = n > 0 ? n : 1;
}

int krs_get_threads(void) {
    init();
    return g_threads;
}

/* Pin OpenMP thread i to the i-th CPU this process may run on (no-op where it can't). Returns the
 * number of threads pinned. */
int krs_pin_threads(void) {
    init();
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof(allowed), &allowed)) return 0;
    int cpus[CPU_SETSIZE], n = 0;
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &allowed)) cpus[n++] = c;
    if (!n) return 0;
    int pinned = 0;
#pragma omp parallel num_threads(g_threads) reduction(+ : pinned)
    {
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpus[omp_get_thread_num() % n], &one);
        pinned += sched_setaffinity(0, sizeof(one), &one) == 0;
    }
    return pinned;
}

static inline float silu(float g) { return g / (1.f + expf(-g)); }

/* rows r0..r1 of one stored matrix (codec) against activation m: out[0..r1-r0) */
static inline void rows_dot(const Kernels *kn, int codec, const void *w0, const void *w1, const void *w2, int K,
                            int r0, int r1, const XQ *xq, const float *xf, float *out) {
    switch (codec) {
    case CODEC_Q8: kn->q8((const int8_t *)w0, (const uint16_t *)w1, K, r0, r1, xq, out); break;
    case CODEC_Q4:
    case CODEC_Q4_G64:
        kn->q4r((const uint8_t *)w0, (const uint16_t *)w1, (const uint16_t *)w2, K, q4_shift(codec), r0, r1, xq, out);
        break;
    case CODEC_BF16: kn->bf16((const uint16_t *)w0, K, r0, r1, xf, out); break;
    default: kn->f32((const float *)w0, K, r0, r1, xf, out); break;
    }
}

/* y[M, sum ns] = x[M, K] @ [W_0; W_1; ...]^T for `count` dense matrices of one codec stored as rows, each its own
 * parts (parts[3 i .. 3 i + 2]: q8: q, scale, -; q4: q, scale, zero; bf16/f32: w, -, -), the outputs side by side.
 * q4 takes K a multiple of its group.
 * x is quantized once and all rows go to one parallel region: a layer's q, k and v projections in one call (k and
 * v alone are 512-row calls that read at a third of the bandwidth of a long one, the fork/join and the ramp-up of
 * the streams left over). Threads split the output rows in chunks that never span two matrices; each chunk of rows
 * is read once for all M activations. */
#define KRS_MAX_MATRICES 8
typedef struct {
    int N, chunk, nchunks;
    int col[KRS_MAX_MATRICES], first[KRS_MAX_MATRICES + 1];
    const int *ns;
    const void *const *parts;
} RowsPlan;

/* ~4 chunks a thread of 8 to 256 rows; the first chunk of each matrix and its first output column */
static void rows_plan(RowsPlan *p, int count, const int *ns, const void *const *parts, int nt) {
    p->ns = ns, p->parts = parts, p->N = 0;
    for (int i = 0; i < count; i++) {
        p->col[i] = p->N;
        p->N += ns[i];
    }
    int chunk = (p->N + nt * 4 - 1) / (nt * 4);
    chunk = (chunk + 7) / 8 * 8;
    p->chunk = chunk < 8 ? 8 : (chunk > 256 ? 256 : chunk);
    p->first[0] = 0;
    for (int i = 0; i < count; i++) p->first[i + 1] = p->first[i] + (ns[i] + p->chunk - 1) / p->chunk;
    p->nchunks = p->first[count];
}

/* chunk c of the plan, its rows read once for all M activations (xq: their int8 groups, NULL for float codecs) */
static void rows_chunk(const Kernels *kn, int codec, const RowsPlan *p, int c, int M, int K, const XQ *xq,
                       const float *x, float *y) {
    float tmp[256];
    int i = 0;
    while (c >= p->first[i + 1]) i++;
    const int r0 = (c - p->first[i]) * p->chunk, r1 = r0 + p->chunk < p->ns[i] ? r0 + p->chunk : p->ns[i];
    const void *const *w = p->parts + 3 * i;
    for (int m = 0; m < M; m++) {
        rows_dot(kn, codec, w[0], w[1], w[2], K, r0, r1, xq ? &xq[m] : NULL, x + (size_t)m * K, tmp);
        memcpy(y + (size_t)m * p->N + p->col[i] + r0, tmp, sizeof(float) * (r1 - r0));
    }
}

static int rows_codec_ok(int codec, int K, int count) {
    return !(is_q4(codec) && K % (32 << q4_shift(codec))) && count >= 1 && count <= KRS_MAX_MATRICES;
}

int krs_linear_multi(int codec, const float *x, int M, int K, int count, const int *ns, const void *const *parts,
                     float *y) {
    init();
    if (!rows_codec_ok(codec, K, count)) return -1;
    const Kernels *kn = &KERNELS[g_isa];
    const int quant = int8_input(codec);
    const int nt = g_threads;
    XQ *xq = NULL;
    if (quant) {
        size_t xb = (xq_bytes(K) + 63) / 64 * 64;
        Carve c = {NULL, 0};
        carve(&c, sizeof(XQ) * (size_t)M);
        carve(&c, xb * (size_t)M);
        if (!(c.base = scratch(SCRATCH_CALL, c.off))) return -2;
        c.off = 0;
        xq = (XQ *)carve(&c, sizeof(XQ) * (size_t)M);
        char *mem = (char *)carve(&c, xb * (size_t)M);
        /* one decode row quantizes in ~1 us: threads only pay off for prefill batches */
#pragma omp parallel for schedule(static) num_threads(nt) if (M > 8)
        for (int m = 0; m < M; m++) {
            xq_init(&xq[m], K, mem + xb * m);
            xq_quantize(&xq[m], x + (size_t)m * K, is_q4(codec), kn->xq32);
        }
    }
    RowsPlan plan;
    rows_plan(&plan, count, ns, parts, nt);
    /* chunks handed out as threads free up: on the 16-core host a step ran 5-8% faster than with static shares,
     * whose slowest thread sets each call's end (docs/BENCHMARKS.md, session 10) */
#pragma omp parallel for schedule(dynamic) num_threads(nt) if (plan.nchunks > 1)
    for (int c = 0; c < plan.nchunks; c++) rows_chunk(kn, codec, &plan, c, M, K, xq, x, y);
    return 0;
}

/* y[M, N] = x[M, K] @ W[N, K]^T for one dense matrix stored as rows (q8: w0 = q, w1 = scale;
 * q4: w0 = q, w1 = scale, w2 = zero; bf16/f32: w0 = w). */
int krs_linear(int codec, const float *x, int M, int K, int N, const void *w0, const void *w1, const void *w2,
               float *y) {
    const void *parts[3] = {w0, w1, w2};
    return krs_linear_multi(codec, x, M, K, 1, &N, parts, y);
}

/* One MoE call's state: its shape, the kept slots grouped by expert, the activations' int8 groups (or the float
 * hidden rows of float codecs). */
typedef struct {
    int codec, q4, gsh, quant, M, H, I, topk, S, kept, nu, nb1, nb2;
    size_t xbH, xbI;
    int *count, *order, *uniq, *ustart;
    XQ *xq, *hq;
    char *xmem, *hmem;
    float *hf;
    const float *x, *wts;
    const int64_t *ptrs;
} MoePlan;

static int moe_plan(MoePlan *p, int codec, const float *x, int M, int H, int I, int topk, const float *wts,
                    const int64_t *ptrs) {
    p->codec = codec, p->q4 = is_q4(codec), p->gsh = q4_shift(codec);
    if (I % (32 << p->gsh) || H % 64) return -1;
    p->quant = int8_input(codec);
    p->M = M, p->H = H, p->I = I, p->topk = topk, p->S = M * topk;
    p->xbH = (xq_bytes(H) + 63) / 64 * 64, p->xbI = (xq_bytes(I) + 63) / 64 * 64;
    p->nb1 = I / 32;        /* 64-row blocks of gate_up: 32 gate + 32 up rows */
    p->nb2 = (H + 63) / 64; /* 64-row blocks of down */
    p->x = x, p->wts = wts, p->ptrs = ptrs;
    return 0;
}

/* the plan's buffers, carved from cv (a first pass with base NULL sums their size) */
static void moe_carve(Carve *cv, MoePlan *p, int E) {
    const size_t S = (size_t)p->S;
    p->count = (int *)carve(cv, sizeof(int) * ((size_t)E + 1));
    p->order = (int *)carve(cv, sizeof(int) * (S + 1));
    p->uniq = (int *)carve(cv, sizeof(int) * (S + 1));
    p->ustart = (int *)carve(cv, sizeof(int) * (S + 1));
    p->xq = (XQ *)carve(cv, sizeof(XQ) * ((size_t)p->M + 1));
    p->hq = (XQ *)carve(cv, sizeof(XQ) * (S + 1));
    p->xmem = p->hmem = NULL;
    p->hf = NULL;
    if (p->quant) {
        p->xmem = (char *)carve(cv, p->xbH * p->M);
        p->hmem = (char *)carve(cv, p->xbI * S);
    } else {
        p->hf = (float *)carve(cv, sizeof(float) * S * p->I);
    }
}

/* group the kept slots (id >= 0) by expert (counting sort); the int8 groups of the hidden rows laid out */
static void moe_group(MoePlan *p, const int32_t *ids, int E) {
    int *count = p->count;
    memset(count, 0, sizeof(int) * ((size_t)E + 1));
    for (int s = 0; s < p->S; s++)
        if (ids[s] >= 0) count[ids[s] + 1]++;
    for (int e = 0; e < E; e++) count[e + 1] += count[e];
    p->kept = count[E];
    p->nu = 0;
    for (int e = 0; e < E; e++)
        if (count[e + 1] > count[e]) { p->uniq[p->nu] = e; p->ustart[p->nu] = count[e]; p->nu++; }
    p->ustart[p->nu] = p->kept;
    for (int s = 0; s < p->S; s++)
        if (ids[s] >= 0) p->order[count[ids[s]]++] = s;
    if (p->quant)
        for (int j = 0; j < p->kept; j++) xq_init(&p->hq[p->order[j]], p->I, p->hmem + p->xbI * p->order[j]);
}

static void moe_quantize_row(const Kernels *kn, MoePlan *p, int m) {
    xq_init(&p->xq[m], p->H, p->xmem + p->xbH * m);
    xq_quantize(&p->xq[m], p->x + (size_t)m * p->H, 0, kn->xq32);
}

/* phase 1 item `it` = (expert, 64-row block of gate_up): 32 outputs of h, one activation group, quantized there */
static void moe_item1(const Kernels *kn, const MoePlan *p, int it) {
    float o64[64], h32[32];
    const int u = it / p->nb1, c = it % p->nb1, H = p->H, I = p->I;
    const int64_t *w = p->ptrs + (size_t)p->uniq[u] * 4;
    for (int j = p->ustart[u]; j < p->ustart[u + 1]; j++) {
        int s = p->order[j], m = s / p->topk;
        if (p->q4)
            kn->q4b((const uint8_t *)w[0] + (size_t)c * H * 32, (const uint16_t *)w[1], 2 * I, 64 * c, H, p->gsh,
                    &p->xq[m], o64);
        else
            rows_dot(kn, p->codec, (const void *)w[0], (const void *)w[1], NULL, H, 64 * c, 64 * c + 64,
                     p->quant ? &p->xq[m] : NULL, p->x + (size_t)m * H, o64);
        for (int d = 0; d < 32; d++) h32[d] = silu(o64[d]) * o64[d + 32];
        if (p->quant) kn->xq32(&p->hq[s], c, h32);
        else memcpy(p->hf + (size_t)s * I + 32 * c, h32, sizeof(h32));
    }
}

/* phase 2 block b = 64 rows of down: every selected expert summed into them, in a fixed order */
static void moe_block2(const Kernels *kn, const MoePlan *p, int b, float *out) {
    float o64[64];
    const int H = p->H, I = p->I;
    const int r0 = 64 * b, r1 = r0 + 64 < H ? r0 + 64 : H;
    for (int m = 0; m < p->M; m++) memset(out + (size_t)m * H + r0, 0, sizeof(float) * (r1 - r0));
    for (int u = 0; u < p->nu; u++) {
        const int64_t *w = p->ptrs + (size_t)p->uniq[u] * 4;
        for (int j = p->ustart[u]; j < p->ustart[u + 1]; j++) {
            int s = p->order[j], m = s / p->topk;
            if (p->q4)
                kn->q4b((const uint8_t *)w[2] + (size_t)b * I * 32, (const uint16_t *)w[3], H, r0, I, p->gsh,
                        &p->hq[s], o64);
            else
                rows_dot(kn, p->codec, (const void *)w[2], (const void *)w[3], NULL, I, r0, r1,
                         p->quant ? &p->hq[s] : NULL, p->hf + (size_t)s * I, o64);
            float wgt = p->wts[s];
            float *dst = out + (size_t)m * H + r0;
            for (int r = 0; r < r1 - r0; r++) dst[r] += wgt * o64[r];
        }
    }
}

/* Routed experts of one MoE layer. x [M, H]; ids/wts [M, topk]; ptrs [E, 4] = per expert the
 * addresses of gate_up q (or w), gate_up scale_zero (q4) / scale (q8), down q (or w), down
 * scale_zero / scale, all in the artifact's CPU-block layout. out [M, H] = sum over the selected
 * experts of wts * down(silu(gate) * up). A negative id skips its slot (it adds nothing and no
 * expert block is read for it: a hybrid engine marks the experts it computes elsewhere with -1);
 * an id >= E is an error (-3). Phase 1: (expert, 64-row block of gate_up) items, each producing
 * 32 outputs of h = one activation group, quantized right there; phase 2: 64-row blocks of down,
 * each thread summing every selected expert into the rows it owns. */
int krs_moe(int codec, const float *x, int M, int H, int I, int E, int topk, const int32_t *ids, const float *wts,
            const int64_t *ptrs, float *out) {
    init();
    MoePlan p;
    if (moe_plan(&p, codec, x, M, H, I, topk, wts, ptrs)) return -1;
    const Kernels *kn = &KERNELS[g_isa];
    for (int s = 0; s < p.S; s++)
        if (ids[s] >= E) return -3;
    Carve cv = {NULL, 0};
    moe_carve(&cv, &p, E);
    if (!(cv.base = scratch(SCRATCH_CALL, cv.off))) return -2;
    cv.off = 0;
    moe_carve(&cv, &p, E);
    moe_group(&p, ids, E);
    if (!p.kept) {
        memset(out, 0, sizeof(float) * (size_t)M * H);
        return 0;
    }
    if (p.quant) {
#pragma omp parallel for schedule(static) num_threads(g_threads) if (M > 8)
        for (int m = 0; m < M; m++) moe_quantize_row(kn, &p, m);
    }
    const int items1 = p.nu * p.nb1;
#pragma omp parallel num_threads(g_threads)
    {
#pragma omp for schedule(dynamic) /* as krs_linear_multi's chunks */
        for (int it = 0; it < items1; it++) moe_item1(kn, &p, it);
        /* no xq_finish for h: its permuted scales and reordered values feed only the q4 rows kernel,
         * which experts never use; a barrier less per layer (each costs a few us at 16 threads) */
#pragma omp for schedule(dynamic) nowait
        for (int b = 0; b < p.nb2; b++) moe_block2(kn, &p, b, out);
    }
    return 0;
}

/* The CPU side of a decode step whose GPU part runs as one CUDA graph: for each layer in order, wait
 * until the GPU has set that layer's `ready` flag (its hidden state, ids and weights are then in the
 * pinned stage), clear it, run the layer's experts into the pinned `out`, and set `done`, which the
 * graph waits on before it reads `out`. Flags are int32 in pinned host memory the GPU reads and
 * writes over PCIe; the release store makes `out` visible before `done`. table[L][7] = ready, done,
 * x, ids, wts, out, expert pointer table (as int64 addresses). stats = {seconds waiting for the GPU,
 * seconds in the experts, expert blocks read}. A flag that does not come within timeout_s, or a
 * failing layer, still releases every later layer (out zeroed) so the graph cannot hang on it, and
 * returns the first error: -4 for the timeout. */
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int wait_flag(int32_t *flag, double deadline) {
    for (unsigned spins = 1;; spins++) {
        if (__atomic_load_n(flag, __ATOMIC_ACQUIRE) == 1) return 0;
#ifdef KRS_X86
        _mm_pause();
#endif
        if (!(spins & 0x3FF) && now_s() > deadline) return -4;
    }
}

int krs_moe_serve(int codec, int H, int I, int E, int topk, int L, const int64_t *table, double timeout_s,
                  double *stats) {
    init();
    int rc = 0;
    double wait = 0.0, work = 0.0, picks = 0.0;
    for (int l = 0; l < L; l++) {
        const int64_t *t = table + (size_t)l * 7;
        int32_t *ready = (int32_t *)t[0], *done = (int32_t *)t[1];
        float *out = (float *)t[5];
        const int32_t *ids = (const int32_t *)t[3];
        double t0 = now_s();
        if (!rc) rc = wait_flag(ready, t0 + timeout_s);
        double t1 = now_s();
        if (!rc) {
            __atomic_store_n(ready, 0, __ATOMIC_RELAXED);
            for (int s = 0; s < topk; s++) picks += ids[s] >= 0;
            rc = krs_moe(codec, (const float *)t[2], 1, H, I, E, topk, ids, (const float *)t[4],
                         (const int64_t *)t[6], out);
        }
        if (rc) memset(out, 0, sizeof(float) * (size_t)H);
        __atomic_store_n(done, 1, __ATOMIC_RELEASE);
        wait += t1 - t0;
        work += now_s() - t1;
    }
    stats[0] += wait;
    stats[1] += work;
    stats[2] += picks;
    return rc;
}

/* Causal attention for T query tokens at positions start..start+T-1 over keys/values 0..start+T-1.
 * q [T, nq, hd] float32; kc/vc bf16 [>= start+T, nkv, hd] (the KV cache); out [T, nq * hd].
 * GQA maps head h to kv head h / (nq / nkv). Work items are (token, kv head, part of the key positions):
 * the heads of a group read each key and value row once between them, and a long cache is split in
 * parts so every thread has some (one token has only nkv groups: 4 for Qwen3-30B-A3B); each part
 * leaves its max, exp sum and unnormalized output, and a second pass combines the parts of each head. */
typedef struct {
    const Kernels *kn;
    const float *q;
    const uint16_t *kc, *vc;
    float *out, *pm, *pl, *po;
    int T, nq, nkv, hd, start, G, part, parts, items;
    float scale;
} AttnPlan;

/* ~4 items a thread, parts of 64 to ATTN_PART positions: a part's fixed cost is the work of a few rows, and the kv
 * heads of one part run one after another (items are ordered token, part, kv head), so a long cache is read in
 * windows of ATTN_PART rows (all heads) that stay in cache, not once per head. Sized for all nt threads: a smaller
 * team (sized to a short cache's work) left the other threads asleep, and waking them for the next kernel made a
 * 16-core step 3x slower (docs/BENCHMARKS.md, session 10). Returns -1 for shapes it does not take. */
static int attn_plan(AttnPlan *a, const float *q, int T, int nq, int nkv, int hd, const uint16_t *kc,
                     const uint16_t *vc, int start, float *out, int nt) {
    if (nq % nkv || T < 1 || hd < 1) return -1;
    enum { ATTN_PART = 256 };
    const int S = start + T;
    /* the vector kernels take rows of whole 8-float vectors */
    a->kn = hd % 8 ? &KERNELS[ISA_SCALAR] : &KERNELS[g_isa];
    a->q = q, a->kc = kc, a->vc = vc, a->out = out;
    a->T = T, a->nq = nq, a->nkv = nkv, a->hd = hd, a->start = start, a->G = nq / nkv;
    a->scale = 1.f / sqrtf((float)hd);
    long want = (long)S * T * nkv / (4L * nt);
    int part = want < 64 ? 64 : (want > ATTN_PART ? ATTN_PART : (int)((want + 63) / 64 * 64));
    a->part = part > S ? S : part;
    a->parts = (S + a->part - 1) / a->part;
    a->items = T * nkv * a->parts;
    return 0;
}

static void attn_carve(Carve *cv, AttnPlan *a) {
    const size_t n = (size_t)a->items * a->G;
    a->pm = (float *)carve(cv, sizeof(float) * n);
    a->pl = (float *)carve(cv, sizeof(float) * n);
    a->po = (float *)carve(cv, sizeof(float) * n * a->hd);
}

/* item it = (token, part, kv head): its max, exp sum and unnormalized output per head of the group; sc holds
 * 8 * part floats of scores */
static void attn_item(const AttnPlan *a, int it, float *sc) {
    const int nkv = a->nkv, G = a->G, hd = a->hd;
    const int t = it / (nkv * a->parts), j = it / nkv % a->parts, kvh = it % nkv;
    const int s0 = j * a->part, n = a->start + t + 1, s1 = s0 + a->part < n ? s0 + a->part : n;
    const size_t at = ((size_t)t * nkv + kvh) * a->parts + j; /* partials stay in (token, head, part) order */
    float *m = a->pm + at * G, *l = a->pl + at * G;
    if (s0 >= s1) { /* past this token's causal limit: an empty part */
        for (int g = 0; g < G; g++) { m[g] = -INFINITY; l[g] = 0.f; }
        return;
    }
    a->kn->attn(a->q + ((size_t)t * a->nq + (size_t)kvh * G) * hd, G, hd, a->kc + (size_t)kvh * hd,
                a->vc + (size_t)kvh * hd, nkv * hd, s0, s1, a->scale, sc, m, l, a->po + at * G * hd);
}

/* query head th = (token, head): its parts combined into out */
static void attn_combine(const AttnPlan *a, int th) {
    const int nq = a->nq, G = a->G, hd = a->hd, parts = a->parts;
    const int t = th / nq, h = th % nq, kvh = h / G, g = h % G;
    const size_t first = ((size_t)t * a->nkv + kvh) * parts;
    const float *pm = a->pm, *pl = a->pl;
    float mx = -INFINITY, tot = 0.f;
    for (int j = 0; j < parts; j++) { /* an empty part has l = 0; a kept one l >= 1 (its max's own term) */
        const size_t at = (first + j) * G + g;
        if (pl[at] > 0.f && pm[at] > mx) mx = pm[at];
    }
    float *o = a->out + (size_t)th * hd;
    for (int i = 0; i < hd; i++) o[i] = 0.f;
    for (int j = 0; j < parts; j++) {
        const size_t at = (first + j) * G + g;
        if (!(pl[at] > 0.f)) continue;
        const float c = expf(pm[at] - mx);
        const float *src = a->po + at * hd;
        tot += c * pl[at];
        for (int i = 0; i < hd; i++) o[i] += c * src[i];
    }
    const float inv = 1.f / tot;
    for (int i = 0; i < hd; i++) o[i] *= inv;
}

int krs_attention(const float *q, int T, int nq, int nkv, int hd, const uint16_t *kc, const uint16_t *vc, int start,
                  float *out) {
    init();
    AttnPlan a;
    if (attn_plan(&a, q, T, nq, nkv, hd, kc, vc, start, out, g_threads)) return -1;
    Carve cv = {NULL, 0};
    attn_carve(&cv, &a);
    if (!(cv.base = scratch(SCRATCH_CALL, cv.off))) return -2;
    cv.off = 0;
    attn_carve(&cv, &a);
    const int threaded = a.items > 1 && (size_t)(start + T) * T * nq * hd > 65536;
    int fail = 0;
#pragma omp parallel num_threads(g_threads) if (threaded) reduction(| : fail)
    {
        float *sc = (float *)scratch(SCRATCH_WORKER, sizeof(float) * 8 * (size_t)a.part);
        if (!sc) fail = 1;
#pragma omp for schedule(static)
        for (int it = 0; it < a.items; it++)
            if (sc) attn_item(&a, it, sc);
#pragma omp for schedule(static)
        for (int th = 0; th < T * nq; th++) attn_combine(&a, th);
    }
    return fail ? -2 : 0;
}

/* Row-wise RMSNorm: x [T, n] float32 -> out [T, n] (out may be x); w [n] float32. */
int krs_rms_norm(const float *x, int T, int n, const float *w, float eps, float *out) {
    init();
    const Kernels *kn = &KERNELS[g_isa];
#pragma omp parallel for schedule(static) num_threads(g_threads) if (T > 1 && (size_t)T * n > 65536)
    for (int t = 0; t < T; t++) kn->rms((const float *)x + (size_t)t * n, w, n, eps, out + (size_t)t * n);
    return 0;
}

/* The residual add and the norm after it: x [T, n] += d [T, n], then out [T, n] = RMSNorm(x) * w. out may
 * not alias x or d. */
int krs_add_rms_norm(float *x, const float *d, int T, int n, const float *w, float eps, float *out) {
    init();
    const Kernels *kn = &KERNELS[g_isa];
#pragma omp parallel for schedule(static) num_threads(g_threads) if (T > 1 && (size_t)T * n > 65536)
    for (int t = 0; t < T; t++) kn->addrms(x + (size_t)t * n, d + (size_t)t * n, w, n, eps, out + (size_t)t * n);
    return 0;
}

/* float32 -> bf16 with torch's rounding (nearest, ties to even; NaN -> 0x7FC0), so a cache written
 * here holds the bytes `cache[...] = k` would have written */
static inline uint16_t f2bf16(float f) {
    union { float f; uint32_t u; } c;
    c.f = f;
    if (f != f) return 0x7FC0;
    return (uint16_t)((c.u + 0x7FFFu + ((c.u >> 16) & 1u)) >> 16);
}

/* One decode step's KV-cache write: k and v (n float32 each) rounded to bf16 into kd and vd. One call
 * for both instead of two torch slice assignments, each a conversion plus a copy (~10 us of dispatch). */
int krs_kv_store(const float *k, const float *v, int64_t n, uint16_t *kd, uint16_t *vd) {
    for (int64_t i = 0; i < n; i++) kd[i] = f2bf16(k[i]);
    for (int64_t i = 0; i < n; i++) vd[i] = f2bf16(v[i]);
    return 0;
}

/* Qwen3's q_norm / k_norm then rotary: x [T, H, D] float32 -> out (may be x); w [D]; cs/sn [T, D]
 * float32 (rotate-half convention, cos/sin repeated over the two halves as rope_cos_sin makes them). */
int krs_norm_rope(const float *x, int T, int H, int D, const float *w, float eps, const float *cs, const float *sn,
                  float *out) {
    init();
    if (D % 2) return -1;
    const Kernels *kn = &KERNELS[g_isa];
    const int items = T * H;
#pragma omp parallel for schedule(static) num_threads(g_threads) if (T > 1 && (size_t)items * D > 65536)
    for (int it = 0; it < items; it++) {
        int t = it / H;
        kn->nrope(x + (size_t)it * D, w, D, eps, cs + (size_t)t * D, sn + (size_t)t * D, out + (size_t)it * D);
    }
    return 0;
}

/* MoE routing: per token softmax over E logits, the k largest probabilities (ties: lower expert
 * first), optionally renormalized to sum 1. logits [T, E] float32 -> ids [T, k] int32, wts [T, k]. */
int krs_route(const float *logits, int T, int E, int k, int renorm, int32_t *ids, float *wts) {
    init();
    if (k < 1 || k > E || k > 64) return -1;
    for (int t = 0; t < T; t++) {
        const float *l = logits + (size_t)t * E;
        float mx = -INFINITY, tot = 0.f;
        for (int e = 0; e < E; e++) mx = l[e] > mx ? l[e] : mx;
        for (int e = 0; e < E; e++) tot += expf(l[e] - mx);
        float bp[64];
        int bi[64], n = 0;
        for (int e = 0; e < E; e++) {
            float p = expf(l[e] - mx) / tot;
            if (n == k && !(p > bp[k - 1])) continue;
            int j = n < k ? n++ : k - 1;
            while (j > 0 && p > bp[j - 1]) { bp[j] = bp[j - 1]; bi[j] = bi[j - 1]; j--; }
            bp[j] = p;
            bi[j] = e;
        }
        float s = 0.f;
        for (int j = 0; j < k; j++) s += bp[j];
        for (int j = 0; j < k; j++) {
            ids[(size_t)t * k + j] = bi[j];
            wts[(size_t)t * k + j] = renorm ? bp[j] / s : bp[j];
        }
    }
    return 0;
}

/* A decode step's layers for one token, all in C: the work of the kernels the Python model calls one by one
 * (models/qwen3_moe.py forward), in the same order, on the same inputs and by the same loop bodies, so the results
 * are bit-equal; what goes is the ~0.1-0.2 ms a layer of Python, ctypes and tensor set-up between them, and the
 * kernels' forks and joins (one parallel region for the step, below). The layer is
 * Qwen3-MoE's: attention with per-head q/k RMSNorm and rotary over a bf16 KV cache, then a routed MoE, each
 * residual add fused with the norm after it. x [H] is the residual stream (updated in place); h [H] enters as
 * the first layer's normed input and leaves as the final norm's output. dims = {H, nq, nkv, hd, E, I, topk,
 * renorm}; cos/sin [hd] are this position's rotary rows. table[L][DL_FIELDS] per layer (int64, addresses as
 * integers): */
enum {
    DL_QKV_CODEC, DL_QKV_PARTS, /* 9 parts: q, k, v matrices x (q, scale, zero) as krs_linear_multi takes them */
    DL_Q_NORM = DL_QKV_PARTS + 9, DL_K_NORM, DL_O_CODEC, DL_O_PARTS, /* 3 parts */
    DL_MLP_NORM = DL_O_PARTS + 3, DL_ROUTER_CODEC, DL_ROUTER, DL_EXPERT_CODEC, DL_EXPERT_PTRS, DL_NEXT_NORM,
    DL_KEYS, DL_VALUES, DL_FIELDS
};

int krs_decode_fields(void) { return DL_FIELDS; }

/* Optional stage clock of krs_decode_layers (a benchmark's view of where a step goes): while set, each call adds
 * the seconds of its stages to g_stage_s[DS_*]. Off (NULL) by default: a clock read costs ~20 ns. */
enum { DS_QKV, DS_ROPE_KV, DS_ATTENTION, DS_O, DS_ROUTER, DS_MOE, DS_NORMS, DS_STAGES };
static double *g_stage_s;

int krs_decode_stages(double *acc) {
    g_stage_s = acc;
    return DS_STAGES;
}

static inline void stage_mark(int stage, double *t) {
    if (!g_stage_s) return;
    double now = now_s();
    g_stage_s[stage] += now - *t;
    *t = now;
}

/* A barrier for the threads of one parallel region that only spins: libgomp's ends in a futex wake (a system call),
 * and its fork and join cost ~7.5 us at 16 threads on the GPU host's guests, where a step forked ~5 regions a layer
 * (docs/BENCHMARKS.md, session 10). Each thread raises its own flag (its own cache line) to the barrier's epoch;
 * thread 0 waits for them all, then raises the release flag. Every thread of the region must take every barrier. */
typedef struct {
    _Alignas(64) int v;
} Flag64;

static inline void cpu_relax(void) {
#ifdef KRS_X86
    _mm_pause();
#endif
}

static inline void spin_until(const int *flag, int e) {
    /* past ~1,000 spins the thread it waits for is likely not running (more threads than cores): give it the core */
    for (unsigned spins = 0; __atomic_load_n(flag, __ATOMIC_ACQUIRE) != e; spins++) {
        if (spins < 1024) cpu_relax();
        else sched_yield();
    }
}

static void spin_barrier(Flag64 *arrive, Flag64 *release, int tid, int nt, int *epoch) {
    const int e = ++*epoch;
    if (tid) {
        __atomic_store_n(&arrive[tid].v, e, __ATOMIC_RELEASE);
        spin_until(&release->v, e);
        return;
    }
    for (int i = 1; i < nt; i++) spin_until(&arrive[i].v, e);
    __atomic_store_n(&release->v, e, __ATOMIC_RELEASE);
}

/* the next item of a loop whose items threads take as they free up */
static inline int next_item(Flag64 *counter) { return __atomic_fetch_add(&counter->v, 1, __ATOMIC_RELAXED); }

enum { NX_QKV, NX_O, NX_ROUTER, NX_MOE1, NX_MOE2, NX_LOOPS };

/* thread 0 before a dense-rows loop of the step: its chunks for this team, its input x quantized where it must be */
static void rows_stage_prepare(const Kernels *kn, int codec, RowsPlan *p, int count, const int *ns,
                               const void *const *parts, int team, XQ *xq, const float *x) {
    rows_plan(p, count, ns, parts, team);
    if (int8_input(codec)) xq_quantize(xq, x, is_q4(codec), kn->xq32);
}

/* every thread: the loop's chunks as they come (krs_linear_multi's bodies, one activation row) */
static void rows_stage_run(const Kernels *kn, int codec, const RowsPlan *p, Flag64 *next, int K, const XQ *xq,
                           const float *x, float *y) {
    for (int c = next_item(next); c < p->nchunks; c = next_item(next))
        rows_chunk(kn, codec, p, c, 1, K, int8_input(codec) ? xq : NULL, x, y);
}

int krs_decode_layers(const int64_t *table, int L, const int32_t *dims, float eps, int pos, const float *cs,
                      const float *sn, float *x, float *h) {
    init();
    const int H = dims[0], nq = dims[1], nkv = dims[2], hd = dims[3], E = dims[4], I = dims[5], topk = dims[6];
    const int renorm = dims[7], nqd = nq * hd, nkd = nkv * hd, nt = g_threads;
    const int ns[3] = {nqd, nkd, nkd};
    if (topk < 1 || topk > 64 || E < topk || hd % 2) return -1;
    const Kernels *kn = &KERNELS[g_isa];
    for (int l = 0; l < L; l++) { /* what each kernel would refuse, refused before anything is written */
        const int64_t *t = table + (size_t)l * DL_FIELDS;
        if (!rows_codec_ok((int)t[DL_QKV_CODEC], H, 3) || !rows_codec_ok((int)t[DL_O_CODEC], nqd, 1) ||
            !rows_codec_ok((int)t[DL_ROUTER_CODEC], H, 1) || t[DL_EXPERT_CODEC] != table[DL_EXPERT_CODEC])
            return -1; /* the experts' buffers are sized once, for one codec */
    }
    AttnPlan att;
    MoePlan moe;
    if (attn_plan(&att, NULL, 1, nq, nkv, hd, NULL, NULL, pos, NULL, nt)) return -1;
    if (moe_plan(&moe, (int)table[DL_EXPERT_CODEC], h, 1, H, I, topk, NULL, NULL)) return -1;
    /* scratch: q|k|v, the normed and rotated q and k, attention out, o, logits, ids and weights, MoE out, the int8
     * groups of h (for q|k|v and the router) and of the attention's output (o_proj), the attention's partials,
     * the MoE's buffers, the barrier's flags and the loops' counters. Its own slot: SCRATCH_CALL stays free */
    const size_t xbH = (xq_bytes(H) + 63) / 64 * 64, xbQ = (xq_bytes(nqd) + 63) / 64 * 64;
    Carve cv = {NULL, 0};
    float *qkv = NULL, *qr = NULL, *kr = NULL, *ao = NULL, *o = NULL, *logits = NULL, *wts = NULL, *mo = NULL;
    int32_t *ids = NULL;
    XQ *xq = NULL;
    char *xh = NULL, *xr = NULL, *xa = NULL;
    Flag64 *arrive = NULL, *release = NULL, *next = NULL;
    for (int pass = 0; pass < 2; pass++) {
        qkv = (float *)carve(&cv, sizeof(float) * (size_t)(nqd + 2 * nkd));
        qr = (float *)carve(&cv, sizeof(float) * (size_t)nqd);
        kr = (float *)carve(&cv, sizeof(float) * (size_t)nkd);
        ao = (float *)carve(&cv, sizeof(float) * (size_t)nqd);
        o = (float *)carve(&cv, sizeof(float) * (size_t)H);
        logits = (float *)carve(&cv, sizeof(float) * (size_t)E);
        wts = (float *)carve(&cv, sizeof(float) * (size_t)topk);
        ids = (int32_t *)carve(&cv, sizeof(int32_t) * (size_t)topk);
        mo = (float *)carve(&cv, sizeof(float) * (size_t)H);
        xq = (XQ *)carve(&cv, sizeof(XQ) * 3);
        xh = (char *)carve(&cv, xbH);
        xr = (char *)carve(&cv, xbH);
        xa = (char *)carve(&cv, xbQ);
        attn_carve(&cv, &att);
        moe_carve(&cv, &moe, E);
        arrive = (Flag64 *)carve(&cv, sizeof(Flag64) * (size_t)nt);
        release = (Flag64 *)carve(&cv, sizeof(Flag64));
        next = (Flag64 *)carve(&cv, sizeof(Flag64) * NX_LOOPS);
        if (pass == 0) {
            if (!(cv.base = scratch(SCRATCH_STEP, cv.off))) return -2;
            cv.off = 0;
        }
    }
    memset(arrive, 0, sizeof(Flag64) * (size_t)nt);
    memset(release, 0, sizeof(Flag64));
    XQ *xq_h = &xq[0], *xq_r = &xq[1], *xq_a = &xq[2];
    xq_init(xq_h, H, xh);
    xq_init(xq_r, H, xr);
    xq_init(xq_a, nqd, xa);
    att.q = qr, att.out = ao;
    moe.wts = wts;
    RowsPlan pq, po, pr;
    const void *qkv_parts[9], *o_parts[3], *r_parts[3];
    const int oN[1] = {H}, rN[1] = {E};
    int rc = 0, items1 = 0;
    double clock = g_stage_s ? now_s() : 0.0;
    /* One region for the whole step: the kernels' work loops (the same bodies as krs_linear_multi, krs_attention and
     * krs_moe run, so the results are the model loop's bit for bit), thread 0 alone between them for the small
     * serial steps (norms, rotary, KV write, routing, quantizing a loop's input), a spin barrier after each. */
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num(), team = omp_get_num_threads();
        int epoch = 0;
        float *sc = (float *)scratch(SCRATCH_WORKER, sizeof(float) * 8 * (size_t)att.part);
        if (!sc) __atomic_store_n(&rc, -2, __ATOMIC_RELAXED);
        for (int l = 0; l < L; l++) {
            const int64_t *t = table + (size_t)l * DL_FIELDS;
            const int qkv_codec = (int)t[DL_QKV_CODEC], o_codec = (int)t[DL_O_CODEC], r_codec = (int)t[DL_ROUTER_CODEC];
            if (tid == 0) { /* q|k|v's input: h, the last layer's (or the caller's) normed residual */
                for (int i = 0; i < 9; i++) qkv_parts[i] = (const void *)t[DL_QKV_PARTS + i];
                rows_stage_prepare(kn, qkv_codec, &pq, 3, ns, qkv_parts, team, xq_h, h);
                for (int i = 0; i < NX_LOOPS; i++) next[i].v = 0;
                stage_mark(DS_NORMS, &clock);
            }
            spin_barrier(arrive, release, tid, team, &epoch);
            rows_stage_run(kn, qkv_codec, &pq, &next[NX_QKV], H, xq_h, h, qkv);
            spin_barrier(arrive, release, tid, team, &epoch);
            if (tid == 0) {
                stage_mark(DS_QKV, &clock);
                uint16_t *keys = (uint16_t *)t[DL_KEYS], *values = (uint16_t *)t[DL_VALUES];
                for (int i = 0; i < nq; i++)
                    kn->nrope(qkv + (size_t)i * hd, (const float *)t[DL_Q_NORM], hd, eps, cs, sn, qr + (size_t)i * hd);
                for (int i = 0; i < nkv; i++)
                    kn->nrope(qkv + nqd + (size_t)i * hd, (const float *)t[DL_K_NORM], hd, eps, cs, sn,
                              kr + (size_t)i * hd);
                krs_kv_store(kr, qkv + nqd + nkd, nkd, keys + (size_t)pos * nkd, values + (size_t)pos * nkd);
                att.kc = keys, att.vc = values;
                stage_mark(DS_ROPE_KV, &clock);
            }
            spin_barrier(arrive, release, tid, team, &epoch);
            if (sc)
                for (int it = att.items * tid / team; it < att.items * (tid + 1) / team; it++) attn_item(&att, it, sc);
            spin_barrier(arrive, release, tid, team, &epoch);
            for (int th = nq * tid / team; th < nq * (tid + 1) / team; th++) attn_combine(&att, th);
            spin_barrier(arrive, release, tid, team, &epoch);
            if (tid == 0) { /* o_proj's input: the attention's output */
                stage_mark(DS_ATTENTION, &clock);
                for (int i = 0; i < 3; i++) o_parts[i] = (const void *)t[DL_O_PARTS + i];
                rows_stage_prepare(kn, o_codec, &po, 1, oN, o_parts, team, xq_a, ao);
            }
            spin_barrier(arrive, release, tid, team, &epoch);
            rows_stage_run(kn, o_codec, &po, &next[NX_O], nqd, xq_a, ao, o);
            spin_barrier(arrive, release, tid, team, &epoch);
            if (tid == 0) { /* the residual add and the MoE's norm; the router's input */
                stage_mark(DS_O, &clock);
                kn->addrms(x, o, (const float *)t[DL_MLP_NORM], H, eps, h);
                stage_mark(DS_NORMS, &clock);
                r_parts[0] = (const void *)t[DL_ROUTER], r_parts[1] = r_parts[2] = NULL;
                rows_stage_prepare(kn, r_codec, &pr, 1, rN, r_parts, team, xq_r, h);
            }
            spin_barrier(arrive, release, tid, team, &epoch);
            rows_stage_run(kn, r_codec, &pr, &next[NX_ROUTER], H, xq_r, h, logits);
            spin_barrier(arrive, release, tid, team, &epoch);
            if (tid == 0) { /* routing; the MoE's slots grouped by expert and its input quantized */
                const int r = krs_route(logits, 1, E, topk, renorm, ids, wts);
                moe.ptrs = (const int64_t *)t[DL_EXPERT_PTRS];
                if (r) { /* nothing to route: no expert is read, the MoE adds zeros */
                    __atomic_store_n(&rc, r, __ATOMIC_RELAXED);
                    moe.nu = moe.kept = 0;
                } else {
                    moe_group(&moe, ids, E);
                    if (moe.quant) moe_quantize_row(kn, &moe, 0);
                }
                items1 = moe.nu * moe.nb1;
                stage_mark(DS_ROUTER, &clock);
            }
            spin_barrier(arrive, release, tid, team, &epoch);
            for (int it = next_item(&next[NX_MOE1]); it < items1; it = next_item(&next[NX_MOE1])) moe_item1(kn, &moe, it);
            spin_barrier(arrive, release, tid, team, &epoch);
            for (int b = next_item(&next[NX_MOE2]); b < moe.nb2; b = next_item(&next[NX_MOE2])) moe_block2(kn, &moe, b, mo);
            spin_barrier(arrive, release, tid, team, &epoch);
            if (tid == 0) { /* the residual add and the next layer's norm (or the final one) */
                stage_mark(DS_MOE, &clock);
                kn->addrms(x, mo, (const float *)t[DL_NEXT_NORM], H, eps, h);
            }
        }
        if (tid == 0) stage_mark(DS_NORMS, &clock);
    }
    return rc;
}

/* Read bandwidth probe: every thread streams its contiguous share of [p, p + n) through this path's widest loads
 * (xor_words); returns the XOR so the reads cannot be optimized away. */
uint64_t krs_read_probe(const void *p, size_t n) {
    init();
    const uint64_t *w = (const uint64_t *)p;
    const size_t words = n / 8;
    const Kernels *kn = &KERNELS[g_isa];
    uint64_t acc = 0;
#pragma omp parallel num_threads(g_threads) reduction(^ : acc)
    {
        const size_t t = (size_t)omp_get_thread_num(), nt = (size_t)omp_get_num_threads();
        const size_t lo = words * t / nt / 8 * 8, hi = t + 1 == nt ? words : words * (t + 1) / nt / 8 * 8;
        acc ^= kn->xorw(w + lo, hi - lo);
    }
    return acc;
}
