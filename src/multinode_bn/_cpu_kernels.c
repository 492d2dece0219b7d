/*
 * One-pass CPU loops for the statistics of synchronized batch normalization.
 *
 * The C side of multinode_bn.cpu_kernels (which documents the arithmetic):
 * each function makes exactly one pass over the batch, with no temporary
 * array, where NumPy needs a chain of ufunc and einsum passes.
 *
 * Arrays arrive as C-contiguous buffers of float32 or float64 seen as
 * (A, C, B): A and B run over the reduced axes, C over the channels. For
 * B == 1 (channels last, (N, C)) the inner loop runs over channels, with
 * the sums kept in registers for blocks of channels; otherwise it runs over
 * the B values of one channel, except that the sums over short runs
 * (B <= 16) keep one accumulator per position for a block of channels.
 * Sums are accumulated in float64.
 *
 * The GIL is released while a loop runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>
#include <string.h>

/* Several instruction-set versions of each loop, picked at load time. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__GLIBC__) && defined(__linux__)
#define MNBN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MNBN_CLONES
#endif

#if defined(_OPENMP) || defined(__GNUC__)
/* The reduction variables of the loops below are always t1 and t2. */
#define MNBN_SIMD_SUMS _Pragma("omp simd reduction(+:t1, t2)")
#define MNBN_SIMD _Pragma("omp simd")
#else
#define MNBN_SIMD_SUMS
#define MNBN_SIMD
#endif

/* ---- loops, instantiated for float and double --------------------------- */

/* Channels summed together when channels are innermost (B == 1): 2 x 64
 * float64 accumulators fill the AVX-512 register file without spilling. */
#define MNBN_CHANNEL_BLOCK 64
/* The shift of the moments: the mean of at least this many leading values
 * of each channel (no pass over the batch). */
#define MNBN_SHIFT_SAMPLE 16
/* Runs of one channel shorter than this (B <= 16: 4 x 4 images and
 * smaller) are summed position by position over blocks of MNBN_SHORT_BLOCK
 * values instead: 3-5 times faster there. Longer runs read the batch in
 * order, which measured faster from the L3 and DRAM (7 x 7 images). */
#define MNBN_SHORT_RUN 17
/* The element-wise loops over channels innermost (B == 1) go block by block
 * of channels for rows of up to this many channels; longer rows are read in
 * order (a block's sweep over rows 4 KiB apart and more thrashes the L1). */
#define MNBN_BLOCKED_MAX 256
#define MNBN_SHORT_BLOCK 512

#define MNBN_DEFINE_LOOPS(T, NAME)                                            \
                                                                              \
/* The two per-channel reductions share one body: with d = x - center[c],     \
 * s1[c] = sum u and s2[c] = sum u * d, where u = d (weighted == 0: the       \
 * shifted sums of the moments) or u = w (weighted == 1: w = gy, the sums of  \
 * the backward). Inlined into each caller with weighted a constant, so the   \
 * choice costs nothing in the loops. Sums in float64. */                     \
static inline __attribute__((always_inline)) void                             \
pair_sums_##NAME(const T *x, const T *w, Py_ssize_t A, Py_ssize_t C,          \
                 Py_ssize_t B, const double *center, double *s1, double *s2,  \
                 const int weighted)                                          \
{                                                                             \
    memset(s1, 0, C * sizeof(double));                                        \
    memset(s2, 0, C * sizeof(double));                                        \
    if (A == 0 || B == 0)                                                     \
        return;                                                               \
    if (B == 1) {                                                             \
        /* Blocks of channels whose accumulators stay in registers. */        \
        Py_ssize_t c0 = 0;                                                    \
        for (; c0 + MNBN_CHANNEL_BLOCK <= C; c0 += MNBN_CHANNEL_BLOCK) {      \
            double t1[MNBN_CHANNEL_BLOCK], t2[MNBN_CHANNEL_BLOCK];            \
            double m[MNBN_CHANNEL_BLOCK];                                     \
            for (int c = 0; c < MNBN_CHANNEL_BLOCK; ++c) {                    \
                t1[c] = t2[c] = 0.0;                                          \
                m[c] = center[c0 + c];                                        \
            }                                                                 \
            for (Py_ssize_t a = 0; a < A; ++a) {                              \
                const T *row = x + a * C + c0, *wrow = w + a * C + c0;        \
                MNBN_SIMD                                                     \
                for (int c = 0; c < MNBN_CHANNEL_BLOCK; ++c) {                \
                    double d = (double)row[c] - m[c];                         \
                    double u = weighted ? (double)wrow[c] : d;                \
                    t1[c] += u;                                               \
                    t2[c] += u * d;                                           \
                }                                                             \
            }                                                                 \
            for (int c = 0; c < MNBN_CHANNEL_BLOCK; ++c) {                    \
                s1[c0 + c] = t1[c];                                           \
                s2[c0 + c] = t2[c];                                           \
            }                                                                 \
        }                                                                     \
        for (Py_ssize_t a = 0; a < A && c0 < C; ++a) {                        \
            const T *row = x + a * C, *wrow = w + a * C;                      \
            MNBN_SIMD                                                         \
            for (Py_ssize_t c = c0; c < C; ++c) {                             \
                double d = (double)row[c] - center[c];                        \
                double u = weighted ? (double)wrow[c] : d;                    \
                s1[c] += u;                                                   \
                s2[c] += u * d;                                               \
            }                                                                 \
        }                                                                     \
        return;                                                               \
    }                                                                         \
    if (B < MNBN_SHORT_RUN) {                                                 \
        /* Short runs (small images): per-position accumulators over the      \
         * rows for a block of channels, folded per channel at the end, so    \
         * no horizontal sum per run. */                                      \
        const Py_ssize_t K = MNBN_SHORT_BLOCK / B;                            \
        double t1[MNBN_SHORT_BLOCK], t2[MNBN_SHORT_BLOCK];                    \
        double m[MNBN_SHORT_BLOCK];                                           \
        for (Py_ssize_t c0 = 0; c0 < C; c0 += K) {                            \
            const Py_ssize_t k = C - c0 < K ? C - c0 : K, E = k * B;          \
            for (Py_ssize_t i = 0; i < E; ++i) {                              \
                t1[i] = t2[i] = 0.0;                                          \
                m[i] = center[c0 + i / B];                                    \
            }                                                                 \
            for (Py_ssize_t a = 0; a < A; ++a) {                              \
                const Py_ssize_t at = (a * C + c0) * B;                       \
                const T *row = x + at, *wrow = w + at;                        \
                MNBN_SIMD                                                     \
                for (Py_ssize_t i = 0; i < E; ++i) {                          \
                    double d = (double)row[i] - m[i];                         \
                    double u = weighted ? (double)wrow[i] : d;                \
                    t1[i] += u;                                               \
                    t2[i] += u * d;                                           \
                }                                                             \
            }                                                                 \
            for (Py_ssize_t i = 0; i < E; ++i) {                              \
                s1[c0 + i / B] += t1[i];                                      \
                s2[c0 + i / B] += t2[i];                                      \
            }                                                                 \
        }                                                                     \
        return;                                                               \
    }                                                                         \
    for (Py_ssize_t a = 0; a < A; ++a) {                                      \
        for (Py_ssize_t c = 0; c < C; ++c) {                                  \
            const Py_ssize_t at = (a * C + c) * B;                            \
            const T *run = x + at, *wrun = w + at;                            \
            const double m = center[c];                                       \
            double t1 = 0.0, t2 = 0.0;                                        \
            MNBN_SIMD_SUMS                                                    \
            for (Py_ssize_t b = 0; b < B; ++b) {                              \
                double d = (double)run[b] - m;                                \
                double u = weighted ? (double)wrun[b] : d;                    \
                t1 += u;                                                      \
                t2 += u * d;                                                  \
            }                                                                 \
            s1[c] += t1;                                                      \
            s2[c] += t2;                                                      \
        }                                                                     \
    }                                                                         \
}                                                                             \
                                                                              \
/* s1[c] = sum (x - shift[c]), s2[c] = sum (x - shift[c])^2, in float64. */   \
MNBN_CLONES static void                                                       \
shifted_sums_##NAME(const T *x, Py_ssize_t A, Py_ssize_t C, Py_ssize_t B,     \
                    const double *shift, double *s1, double *s2)              \
{                                                                             \
    pair_sums_##NAME(x, x, A, C, B, shift, s1, s2, 0);                        \
}                                                                             \
                                                                              \
/* g1[c] = sum gy, g2[c] = sum gy * (x - mean[c]), in float64. */             \
MNBN_CLONES static void                                                       \
gradient_sums_##NAME(const T *x, const T *gy, Py_ssize_t A, Py_ssize_t C,     \
                     Py_ssize_t B, const double *mean, double *g1,            \
                     double *g2)                                              \
{                                                                             \
    pair_sums_##NAME(x, gy, A, C, B, mean, g1, g2, 1);                        \
}                                                                             \
                                                                              \
/* (count, mean, m2) per channel into moments (C x 3), and the shift used:    \
 * the mean of the first SHIFT_SAMPLE values of each channel, replaced by     \
 * the mean itself (and the sums redone) when it lies more than tolerance     \
 * standard deviations away. s1 and s2 are scratch of C values each. */       \
MNBN_CLONES static void                                                       \
local_moments_##NAME(const T *x, Py_ssize_t A, Py_ssize_t C, Py_ssize_t B,    \
                     double tolerance, double *shift, double *moments,        \
                     double *s1, double *s2)                                  \
{                                                                             \
    const Py_ssize_t run = B < MNBN_SHIFT_SAMPLE ? B : MNBN_SHIFT_SAMPLE;     \
    Py_ssize_t rows = (MNBN_SHIFT_SAMPLE + run - 1) / run;                    \
    rows = rows < A ? rows : A;                                               \
    const double n = (double)A * (double)B;                                   \
    const double tol2 = tolerance * tolerance;                                \
    memset(shift, 0, C * sizeof(double));                                     \
    for (Py_ssize_t a = 0; a < rows; ++a)                                     \
        for (Py_ssize_t c = 0; c < C; ++c)                                    \
            for (Py_ssize_t b = 0; b < run; ++b)                              \
                shift[c] += (double)x[(a * C + c) * B + b];                   \
    for (Py_ssize_t c = 0; c < C; ++c)                                        \
        shift[c] /= (double)(rows * run);                                     \
    shifted_sums_##NAME(x, A, C, B, shift, s1, s2);                           \
    int redo = 0;                                                             \
    for (Py_ssize_t c = 0; c < C; ++c)                                        \
        /* (s1 / n)^2 > tol^2 * m2 / n, with m2 = s2 - s1^2 / n */            \
        redo |= s1[c] * s1[c] * (1.0 + tol2) > s2[c] * (tol2 * n);            \
    if (redo) {                                                               \
        for (Py_ssize_t c = 0; c < C; ++c)                                    \
            shift[c] += s1[c] / n;                                            \
        shifted_sums_##NAME(x, A, C, B, shift, s1, s2);                       \
    }                                                                         \
    for (Py_ssize_t c = 0; c < C; ++c) {                                      \
        const double m2 = s2[c] - s1[c] * s1[c] / n;                          \
        moments[3 * c] = n;                                                   \
        moments[3 * c + 1] = shift[c] + s1[c] / n;                            \
        /* NaN stays NaN (a non-finite batch must not look like var 0). */    \
        moments[3 * c + 2] = m2 < 0.0 ? 0.0 : m2;                             \
    }                                                                         \
}                                                                             \
                                                                              \
/* y = (x - shift[c]) * scale[c] + offset[c], in T. */                        \
MNBN_CLONES static void                                                       \
scale_shift_##NAME(const T *x, Py_ssize_t A, Py_ssize_t C, Py_ssize_t B,      \
                   const T *shift, const T *scale, const T *offset, T *y)     \
{                                                                             \
    if (A == 0 || B == 0 || C == 0)                                           \
        return;                                                               \
    if (B == 1) {                                                             \
        /* Few channels: blocks whose coefficients stay in registers. */      \
        Py_ssize_t c0 = 0;                                                    \
        for (; C <= MNBN_BLOCKED_MAX && c0 + MNBN_CHANNEL_BLOCK <= C;         \
             c0 += MNBN_CHANNEL_BLOCK) {                                      \
            T s[MNBN_CHANNEL_BLOCK], k[MNBN_CHANNEL_BLOCK];                   \
            T o[MNBN_CHANNEL_BLOCK];                                          \
            for (int c = 0; c < MNBN_CHANNEL_BLOCK; ++c) {                    \
                s[c] = shift[c0 + c];                                         \
                k[c] = scale[c0 + c];                                         \
                o[c] = offset[c0 + c];                                        \
            }                                                                 \
            for (Py_ssize_t a = 0; a < A; ++a) {                              \
                const T *row = x + a * C + c0;                                \
                T *out = y + a * C + c0;                                      \
                MNBN_SIMD                                                     \
                for (int c = 0; c < MNBN_CHANNEL_BLOCK; ++c)                  \
                    out[c] = (row[c] - s[c]) * k[c] + o[c];                   \
            }                                                                 \
        }                                                                     \
        for (Py_ssize_t a = 0; a < A && c0 < C; ++a) {                        \
            const T *row = x + a * C;                                         \
            T *out = y + a * C;                                               \
            MNBN_SIMD                                                         \
            for (Py_ssize_t c = c0; c < C; ++c)                               \
                out[c] = (row[c] - shift[c]) * scale[c] + offset[c];          \
        }                                                                     \
        return;                                                               \
    }                                                                         \
    for (Py_ssize_t a = 0; a < A; ++a) {                                      \
        for (Py_ssize_t c = 0; c < C; ++c) {                                  \
            const Py_ssize_t at = (a * C + c) * B;                            \
            const T *run = x + at;                                            \
            T *out = y + at;                                                  \
            const T s = shift[c], k = scale[c], o = offset[c];                \
            MNBN_SIMD                                                         \
            for (Py_ssize_t b = 0; b < B; ++b)                                \
                out[b] = (run[b] - s) * k + o;                                \
        }                                                                     \
    }                                                                         \
}                                                                             \
                                                                              \
/* gx = p[c] * gy + q[c] * (x - shift[c]) + r[c], in T. */                    \
MNBN_CLONES static void                                                       \
input_gradient_##NAME(const T *x, const T *gy, Py_ssize_t A, Py_ssize_t C,    \
                      Py_ssize_t B, const T *shift, const T *p, const T *q,   \
                      const T *r, T *gx)                                      \
{                                                                             \
    if (A == 0 || B == 0 || C == 0)                                           \
        return;                                                               \
    if (B == 1) {                                                             \
        /* Few channels: blocks of channels whose coefficients stay in      \
         * registers, as in the sums (two loads and one store per value). */  \
        Py_ssize_t c0 = 0;                                                    \
        for (; C <= MNBN_BLOCKED_MAX && c0 + MNBN_CHANNEL_BLOCK <= C;         \
             c0 += MNBN_CHANNEL_BLOCK) {                                      \
            T s[MNBN_CHANNEL_BLOCK], pb[MNBN_CHANNEL_BLOCK];                  \
            T qb[MNBN_CHANNEL_BLOCK], rb[MNBN_CHANNEL_BLOCK];                 \
            for (int c = 0; c < MNBN_CHANNEL_BLOCK; ++c) {                    \
                s[c] = shift[c0 + c];                                         \
                pb[c] = p[c0 + c];                                            \
                qb[c] = q[c0 + c];                                            \
                rb[c] = r[c0 + c];                                            \
            }                                                                 \
            for (Py_ssize_t a = 0; a < A; ++a) {                              \
                const T *row = x + a * C + c0, *grow = gy + a * C + c0;       \
                T *out = gx + a * C + c0;                                     \
                MNBN_SIMD                                                     \
                for (int c = 0; c < MNBN_CHANNEL_BLOCK; ++c)                  \
                    out[c] = pb[c] * grow[c] + qb[c] * (row[c] - s[c])        \
                        + rb[c];                                              \
            }                                                                 \
        }                                                                     \
        for (Py_ssize_t a = 0; a < A && c0 < C; ++a) {                        \
            const T *row = x + a * C, *grow = gy + a * C;                     \
            T *out = gx + a * C;                                              \
            MNBN_SIMD                                                         \
            for (Py_ssize_t c = c0; c < C; ++c)                               \
                out[c] = p[c] * grow[c] + q[c] * (row[c] - shift[c]) + r[c];  \
        }                                                                     \
        return;                                                               \
    }                                                                         \
    for (Py_ssize_t a = 0; a < A; ++a) {                                      \
        for (Py_ssize_t c = 0; c < C; ++c) {                                  \
            const Py_ssize_t at = (a * C + c) * B;                            \
            const T *run = x + at, *grun = gy + at;                           \
            T *out = gx + at;                                                 \
            const T s = shift[c], pc = p[c], qc = q[c], rc = r[c];            \
            MNBN_SIMD                                                         \
            for (Py_ssize_t b = 0; b < B; ++b)                                \
                out[b] = pc * grun[b] + qc * (run[b] - s) + rc;               \
        }                                                                     \
    }                                                                         \
}

MNBN_DEFINE_LOOPS(float, f4)
MNBN_DEFINE_LOOPS(double, f8)

/* ---- argument checks ---------------------------------------------------- */

/* Element size of the dtype code passed from Python: 4 or 8. */
static int
item_size(int code)
{
    if (code == 4 || code == 8)
        return code;
    PyErr_Format(PyExc_ValueError, "itemsize must be 4 or 8, got %d", code);
    return 0;
}

static int
check_length(const Py_buffer *buf, Py_ssize_t count, Py_ssize_t itemsize,
             const char *name)
{
    if (count < 0 || count > PY_SSIZE_T_MAX / itemsize ||
            buf->len != count * itemsize) {
        PyErr_Format(PyExc_ValueError,
                     "%s holds %zd bytes; expected %zd values of %zd bytes",
                     name, buf->len, count, itemsize);
        return -1;
    }
    return 0;
}

/* Non-negative, and A * C * B and 4 * C values of 8 bytes stay countable:
 * every product the entry points form is then free of overflow. */
static int
check_shape(Py_ssize_t A, Py_ssize_t C, Py_ssize_t B)
{
    const Py_ssize_t limit = PY_SSIZE_T_MAX / 8;
    if (A < 0 || C < 0 || B < 0 || C > limit / 4 ||
            (A > 0 && C > limit / A) ||
            (A > 0 && C > 0 && B > limit / (A * C))) {
        PyErr_Format(PyExc_ValueError,
                     "invalid (A, C, B) shape (%zd, %zd, %zd)", A, C, B);
        return -1;
    }
    return 0;
}

/* What one buffer argument holds: the whole batch (A * C * B values of the
 * input dtype), or `per_channel * C` values of the input dtype or float64;
 * and whether the loop writes it. */
enum { BATCH, CHANNELS, CHANNELS_F8 };

typedef struct {
    const char *name;
    int kind;
    Py_ssize_t per_channel;
    int written;
} Operand;

/* One call's arguments: (itemsize, A, C, B, buffer, ...[, number]). */
typedef struct {
    Py_buffer buf[4];
    int n;
    int size;
    Py_ssize_t A, C, B;
} Call;

static PyObject *
close_call(Call *call)
{
    for (int i = 0; i < call->n; ++i)
        PyBuffer_Release(&call->buf[i]);
    Py_RETURN_NONE;
}

/* Parses and checks the arguments against `ops` (3 or 4 buffers), then a
 * float into `number` when it is not NULL; on failure sets the error,
 * releases what it took and returns -1. */
static int
open_call(Call *call, PyObject *args, const Operand *ops, int n,
          double *number)
{
    char format[24] = "innn";
    int code, ok;
    Py_buffer *b = call->buf;
    for (int i = 0; i < n; ++i)
        strcat(format, ops[i].written ? "w*" : "y*");
    if (number)
        strcat(format, "d");
    call->n = 0;
    /* Pointers past those the format names are not read. */
    if (n == 3)
        ok = PyArg_ParseTuple(args, format, &code, &call->A, &call->C,
                              &call->B, &b[0], &b[1], &b[2], number);
    else
        ok = PyArg_ParseTuple(args, format, &code, &call->A, &call->C,
                              &call->B, &b[0], &b[1], &b[2], &b[3], number);
    if (!ok)
        return -1;
    call->n = n;
    call->size = item_size(code);
    if (!call->size || check_shape(call->A, call->C, call->B))
        goto fail;
    for (int i = 0; i < n; ++i) {
        Py_ssize_t count = ops[i].kind == BATCH
            ? call->A * call->C * call->B : ops[i].per_channel * call->C;
        Py_ssize_t itemsize = ops[i].kind == CHANNELS_F8 ? 8 : call->size;
        if (check_length(&b[i], count, itemsize, ops[i].name))
            goto fail;
    }
    return 0;
fail:
    Py_DECREF(close_call(call));
    return -1;
}

/* ---- one call of a loop, from checked arguments ------------------------ */

/* Runs one loop over the buffers of `k` (GIL released): `number` is the
 * call's float argument, `scratch` holds `Kernel.scratch * C` doubles. */
typedef void (*Runner)(const Call *k, double number, double *scratch);

#define MNBN_DEFINE_RUNNERS(T, NAME)                                          \
static void                                                                   \
run_local_moments_##NAME(const Call *k, double number, double *scratch)       \
{                                                                             \
    local_moments_##NAME(k->buf[0].buf, k->A, k->C, k->B, number,             \
                         k->buf[1].buf, k->buf[2].buf, scratch,               \
                         scratch + k->C);                                     \
}                                                                             \
                                                                              \
static void                                                                   \
run_scale_shift_##NAME(const Call *k, double number, double *scratch)         \
{                                                                             \
    const T *c = k->buf[1].buf;                                               \
    scale_shift_##NAME(k->buf[0].buf, k->A, k->C, k->B, c, c + k->C,          \
                       c + 2 * k->C, k->buf[2].buf);                          \
}                                                                             \
                                                                              \
static void                                                                   \
run_gradient_sums_##NAME(const Call *k, double number, double *scratch)       \
{                                                                             \
    double *out = k->buf[3].buf;                                              \
    gradient_sums_##NAME(k->buf[0].buf, k->buf[1].buf, k->A, k->C, k->B,     \
                         k->buf[2].buf, out, out + k->C);                     \
}                                                                             \
                                                                              \
static void                                                                   \
run_input_gradient_##NAME(const Call *k, double number, double *scratch)      \
{                                                                             \
    const T *c = k->buf[2].buf;                                               \
    input_gradient_##NAME(k->buf[0].buf, k->buf[1].buf, k->A, k->C, k->B, c,  \
                          c + k->C, c + 2 * k->C, c + 3 * k->C,               \
                          k->buf[3].buf);                                     \
}

MNBN_DEFINE_RUNNERS(float, f4)
MNBN_DEFINE_RUNNERS(double, f8)

/* One entry point: its buffers, whether it takes a float after them and
 * needs a non-empty batch, its scratch per channel, its two loops. */
typedef struct {
    const Operand *ops;
    int n;
    int takes_number;
    int needs_values;
    Py_ssize_t scratch;
    Runner f4, f8;
} Kernel;

static PyObject *
run_kernel(PyObject *args, const Kernel *kernel)
{
    Call k;
    double number = 0.0;
    if (open_call(&k, args, kernel->ops, kernel->n,
                  kernel->takes_number ? &number : NULL))
        return NULL;
    if (kernel->needs_values && (k.A == 0 || k.B == 0)) {
        Py_DECREF(close_call(&k));
        PyErr_SetString(PyExc_ValueError, "empty batch: no values to sum");
        return NULL;
    }
    double *scratch = NULL;
    if (kernel->scratch) {
        scratch = PyMem_Malloc((kernel->scratch * k.C + 1) * sizeof(double));
        if (!scratch) {
            Py_DECREF(close_call(&k));
            return PyErr_NoMemory();
        }
    }
    Runner run = k.size == 4 ? kernel->f4 : kernel->f8;
    Py_BEGIN_ALLOW_THREADS
    run(&k, number, scratch);
    Py_END_ALLOW_THREADS
    PyMem_Free(scratch);
    return close_call(&k);
}

#define MNBN_ENTRY(NAME, NBUF, NUMBER, VALUES, SCRATCH)                       \
static const Kernel NAME##_kernel = {                                         \
    NAME##_ops, NBUF, NUMBER, VALUES, SCRATCH,                                \
    run_##NAME##_f4, run_##NAME##_f8};                                        \
                                                                              \
static PyObject *                                                             \
py_##NAME(PyObject *self, PyObject *args)                                     \
{                                                                             \
    return run_kernel(args, &NAME##_kernel);                                  \
}

/* ---- Python entry points ------------------------------------------------ */

PyDoc_STRVAR(local_moments_doc,
"local_moments(itemsize, A, C, B, x, shift, moments, tolerance)\n\n"
"moments[c] = (count, mean, m2) of the A * B values of channel c, from\n"
"float64 sums shifted by shift[c] (written): the mean of the channel's\n"
"first 16 values, or the mean itself when that lies more than tolerance\n"
"standard deviations away (the sums are then redone once).\n"
"x: (A, C, B) float32 or float64 with A * B > 0; shift: (C,) float64;\n"
"moments: (C, 3) float64.");

static const Operand local_moments_ops[] = {
    {"x", BATCH, 0, 0}, {"shift", CHANNELS_F8, 1, 1},
    {"moments", CHANNELS_F8, 3, 1}};
MNBN_ENTRY(local_moments, 3, 1, 1, 2)

PyDoc_STRVAR(scale_shift_doc,
"scale_shift(itemsize, A, C, B, x, coef, y)\n\n"
"y = (x - shift[c]) * scale[c] + offset[c], with coef = (shift, scale,\n"
"offset) as a (3, C) array of the dtype of x and y.");

static const Operand scale_shift_ops[] = {
    {"x", BATCH, 0, 0}, {"coef", CHANNELS, 3, 0}, {"y", BATCH, 0, 1}};
MNBN_ENTRY(scale_shift, 3, 0, 0, 0)

PyDoc_STRVAR(gradient_sums_doc,
"gradient_sums(itemsize, A, C, B, x, gy, mean, out)\n\n"
"out[0, c] = sum(gy) and out[1, c] = sum(gy * (x - mean[c])) over channel\n"
"c, accumulated in float64. x, gy: (A, C, B) of one dtype; mean: (C,)\n"
"float64; out: (2, C) float64.");

static const Operand gradient_sums_ops[] = {
    {"x", BATCH, 0, 0}, {"gy", BATCH, 0, 0}, {"mean", CHANNELS_F8, 1, 0},
    {"out", CHANNELS_F8, 2, 1}};
MNBN_ENTRY(gradient_sums, 4, 0, 0, 0)

PyDoc_STRVAR(input_gradient_doc,
"input_gradient(itemsize, A, C, B, x, gy, coef, gx)\n\n"
"gx = p[c] * gy + q[c] * (x - shift[c]) + r[c], with coef = (shift, p, q,\n"
"r) as a (4, C) array of the dtype of x, gy and gx.");

static const Operand input_gradient_ops[] = {
    {"x", BATCH, 0, 0}, {"gy", BATCH, 0, 0}, {"coef", CHANNELS, 4, 0},
    {"gx", BATCH, 0, 1}};
MNBN_ENTRY(input_gradient, 4, 0, 0, 0)

static PyMethodDef methods[] = {
    {"local_moments", py_local_moments, METH_VARARGS, local_moments_doc},
    {"scale_shift", py_scale_shift, METH_VARARGS, scale_shift_doc},
    {"gradient_sums", py_gradient_sums, METH_VARARGS, gradient_sums_doc},
    {"input_gradient", py_input_gradient, METH_VARARGS, input_gradient_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cpu_kernels",
    "One-pass CPU loops of multinode_bn.cpu_kernels.", -1, methods,
};

PyMODINIT_FUNC
PyInit__cpu_kernels(void)
{
    return PyModule_Create(&module);
}
