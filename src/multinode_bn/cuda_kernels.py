"""Fused CUDA kernels for the statistics of synchronized batch normalization.

The GPU side of :mod:`multinode_bn.statistics`: the same per-channel
quantities, each computed in one pass over the batch by a CuPy ``RawModule``
kernel instead of a chain of generic CuPy reductions. Like the rest of the
statistics layer, nothing here knows Chainer or MPI, and CuPy is imported
only when a function is called, so the module imports without it.

Inputs are seen as ``(A, C, B)`` (see
:func:`multinode_bn.statistics.reduced_view`) and made C-contiguous.

Local moments (:func:`local_moments`)
    One pass. Each thread sums ``d = x - s`` and ``d * d`` over runs of
    :data:`CHUNK` of its values in the accumulation dtype (float32 for
    float16 and float32 inputs), where the shift ``s`` is the first value of
    the run itself; at the end of a run, ``(count, mean, m2)`` of the run
    follow in float64 as ``mean = s + sum(d) / k`` and
    ``m2 = sum(d * d) - sum(d)**2 / k``, and runs, threads, blocks and
    finally the blocks of a channel are combined with the pairwise formula of
    Chan, Golub and LeVeque in float64, in a fixed order (bit-reproducible).
    Because the shift is a member of the run, ``(s - mean)**2 <= (k - 1) *
    var`` of the run, so the shifted sums lose at most about ``k`` units of
    rounding whatever the data: no pass to find a shift first, and no
    second pass when the first values of the batch are not representative.

Normalization (:func:`normalize_into`)
    ``y = (x - shift) * scale + offset`` with per-channel float32 (float64
    for float64 statistics) ``shift``, ``scale`` and ``offset``, written in
    the dtype of ``x``. Subtracting a shift near the data first keeps the
    output's digits when the mean is large compared with the spread.

Backward sums (:func:`backward_sums`)
    ``sum gy`` and ``sum gy * (x - shift)`` per channel in one pass, with
    ``shift`` the float64 mean rounded to the accumulation dtype; the
    rounding remainder is applied in float64, as on the CPU.

Input gradient (:func:`input_gradient_into`)
    ``gx = a * (gy + b * (x - shift) + c)`` in one pass, with the
    coefficients of
    :func:`multinode_bn.statistics.input_gradient_coefficients`.

The CPU path returns ``centred = x - shift`` as a real array; the kernels
subtract the shift as they read ``x`` instead, so what they hand from
:func:`local_moments` to :func:`normalize_into` (and from
:func:`backward_sums` to :func:`input_gradient_into`) is a
:class:`ShiftedInput` holding ``x`` and ``shift``.

Set ``MULTINODE_BN_CUDA_KERNELS=0`` to make :func:`enabled` return
``False`` (the statistics layer then falls back to generic CuPy code).
"""

import os

import numpy

MOMENTS_DTYPE = numpy.float64

#: Values one thread sums in the accumulation dtype before the run is folded
#: into its float64 moments. The relative error of a run's ``m2`` is bounded
#: by about ``CHUNK**2`` units of rounding in the worst case (a run whose
#: first value is its farthest outlier), about ``2.4e-4`` for float32, and is
#: near ``sqrt(CHUNK)`` units for ordinary data.
CHUNK = 64
#: Threads per block of every kernel except the finalizers.
THREADS = 256
#: Inner lengths ``B`` below this use the column kernels: a block covers
#: consecutive ``(c, b)`` columns of several rows, so reads stay coalesced
#: for channels-last and ``(N, C)`` inputs.
NARROW_INNER = 32
#: Threads per block of the finalizers (one warp per channel).
FINALIZE_THREADS = 128
#: Least values per thread of a block of the wide kernels, and least rows
#: per thread of the column kernels: each block writes one float64 partial
#: per channel (wide) or per column (narrow), which must stay small next to
#: what it reads.
WIDE_VALUES_PER_THREAD = 4
NARROW_ROWS_PER_THREAD = 32

# C-contiguous float64 structs of the kernels.
_TRIPLE = 3  # Triple {n, mean, m2}
_PAIR = 2    # Pair {gy, gy_d}

SOURCE = r'''
// The typedefs of in_t (storage of x, gy, y, gx) and acc_t (accumulation
// and per-channel coefficients), and MNBN_CHUNK, are prepended by the
// Python side.

struct Triple { double n, mean, m2; };
struct Pair { double g, gd; };

#ifndef __CUDA_ARCH__
// Host fallbacks: only seen when this source is compiled for a CPU (the
// emulation used by the tests). NVRTC always defines __CUDA_ARCH__.
static inline float mnbn_host_h2f(unsigned short h) {
    unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    unsigned int e = (h >> 10) & 0x1fu;
    unsigned int m = h & 0x3ffu;
    union { unsigned int u; float f; } v;
    if (e == 0x1fu) {
        v.u = sign | 0x7f800000u | (m << 13);
    } else if (e != 0) {
        v.u = sign | ((e + 112u) << 23) | (m << 13);
    } else if (m == 0) {
        v.u = sign;
    } else {
        v.f = (float)m * (1.0f / 16777216.0f);
        v.u |= sign;
    }
    return v.f;
}

static inline unsigned short mnbn_host_f2h(float f) {
    union { float f; unsigned int u; } v;
    v.f = f;
    unsigned int x = v.u;
    unsigned int sign = (x >> 16) & 0x8000u;
    unsigned int mant = x & 0x7fffffu;
    int exp = (int)((x >> 23) & 0xffu);
    if (exp == 255) {
        return (unsigned short)(sign | 0x7c00u | (mant ? 0x200u : 0u));
    }
    int e = exp - 127 + 15;
    if (e >= 31) {
        return (unsigned short)(sign | 0x7c00u);
    }
    if (e <= 0) {
        if (e < -10) {
            return (unsigned short)sign;
        }
        mant |= 0x800000u;
        int shift = 14 - e;
        unsigned int h = mant >> shift;
        unsigned int rem = mant & ((1u << shift) - 1u);
        unsigned int half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1u))) {
            h++;
        }
        return (unsigned short)(sign | h);
    }
    unsigned int h = ((unsigned int)e << 10) | (mant >> 13);
    unsigned int rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) {
        h++;
    }
    return (unsigned short)(sign | h);
}
#endif

// float16 storage: conversions by PTX, so that no header is needed.
struct half_t { unsigned short bits; };

__device__ __forceinline__ float mnbn_h2f(unsigned short h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    return mnbn_host_h2f(h);
#endif
}

__device__ __forceinline__ unsigned short mnbn_f2h(float f) {
#ifdef __CUDA_ARCH__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    return mnbn_host_f2h(f);
#endif
}

__device__ __forceinline__ acc_t mnbn_load(const float* p, long long i) {
    return (acc_t)p[i];
}
__device__ __forceinline__ acc_t mnbn_load(const double* p, long long i) {
    return (acc_t)p[i];
}
__device__ __forceinline__ acc_t mnbn_load(const half_t* p, long long i) {
    return (acc_t)mnbn_h2f(p[i].bits);
}
__device__ __forceinline__ void mnbn_store(float* p, long long i, acc_t v) {
    p[i] = (float)v;
}
__device__ __forceinline__ void mnbn_store(double* p, long long i, acc_t v) {
    p[i] = (double)v;
}
__device__ __forceinline__ void mnbn_store(half_t* p, long long i, acc_t v) {
    p[i].bits = mnbn_f2h((float)v);
}

// Chan, Golub and LeVeque: a += b, stable whatever the two means.
__device__ __forceinline__ void mnbn_merge(Triple& a, const Triple& b) {
    if (b.n == 0.0) {
        return;
    }
    if (a.n == 0.0) {
        a = b;
        return;
    }
    double n = a.n + b.n;
    double delta = b.mean - a.mean;
    double w = b.n / n;
    a.m2 += b.m2 + delta * delta * a.n * w;
    a.mean += delta * w;
    a.n = n;
}

__device__ __forceinline__ void mnbn_merge(Pair& a, const Pair& b) {
    a.g += b.g;
    a.gd += b.gd;
}

__device__ __forceinline__ void mnbn_zero(Triple& t) {
    t.n = 0.0; t.mean = 0.0; t.m2 = 0.0;
}

__device__ __forceinline__ void mnbn_zero(Pair& t) {
    t.g = 0.0; t.gd = 0.0;
}

// Per-thread moments: runs of MNBN_CHUNK values shifted by their first
// value, folded into float64 (count, mean, m2).
struct MomentRun {
    Triple t;
    acc_t shift, s1, s2;
    int k;

    __device__ __forceinline__ void init() {
        mnbn_zero(t);
        shift = 0; s1 = 0; s2 = 0;
        k = 0;
    }
    __device__ __forceinline__ void fold() {
        if (k == 0) {
            return;
        }
        Triple r;
        r.n = (double)k;
        double m = (double)s1 / r.n;
        r.mean = (double)shift + m;
        r.m2 = (double)s2 - (double)s1 * m;
        // Not fmax: a NaN must reach the caller's finiteness check.
        if (r.m2 < 0.0) {
            r.m2 = 0.0;
        }
        mnbn_merge(t, r);
        s1 = 0; s2 = 0;
        k = 0;
    }
    __device__ __forceinline__ void add(acc_t v) {
        if (k == 0) {
            shift = v;
        }
        acc_t d = v - shift;
        s1 += d;
        s2 += d * d;
        if (++k == MNBN_CHUNK) {
            fold();
        }
    }
    __device__ __forceinline__ void push(const in_t* x, const in_t* gy,
                                         long long i, acc_t s) {
        add(mnbn_load(x, i));
    }
};

// Per-thread backward sums: runs in acc_t, totals in float64.
struct GradRun {
    Pair t;
    acc_t g, gd;
    int k;

    __device__ __forceinline__ void init() {
        mnbn_zero(t);
        g = 0; gd = 0;
        k = 0;
    }
    __device__ __forceinline__ void fold() {
        t.g += (double)g;
        t.gd += (double)gd;
        g = 0; gd = 0;
        k = 0;
    }
    __device__ __forceinline__ void add(acc_t gy, acc_t d) {
        g += gy;
        gd += gy * d;
        if (++k == MNBN_CHUNK) {
            fold();
        }
    }
    __device__ __forceinline__ void push(const in_t* x, const in_t* gy,
                                         long long i, acc_t s) {
        add(mnbn_load(gy, i), mnbn_load(x, i) - s);
    }
};

// sh[r * W + w] for r < R holds one value per (r, w); on return sh[w] holds
// their combination over r, in a fixed order. Every thread of the block
// must call it.
template <class P>
__device__ __forceinline__ void mnbn_reduce_rows(P* sh, int w, int r, int W,
                                                  int R) {
    int p = 1;
    while (p < R) {
        p <<= 1;
    }
    for (int s = p >> 1; s > 0; s >>= 1) {
        if (r < s && r + s < R) {
            mnbn_merge(sh[r * W + w], sh[(r + s) * W + w]);
        }
        __syncthreads();
    }
}

// Wide layout (B >= NARROW_INNER): block (c, g) reads values
// [g * per_block, (g + 1) * per_block) of channel c, in (a, b) order.
// Writes partial[g * C + c].
template <class Run, class P>
__device__ __forceinline__ void mnbn_wide(
        const in_t* x, const in_t* gy, const acc_t* shift, long long A,
        long long C, long long B, long long per_block, P* partial) {
    __shared__ P sh[256];
    const long long c = blockIdx.x;
    const long long g = blockIdx.y;
    const long long L = A * B;
    const long long CB = C * B;
    long long e = g * per_block + threadIdx.x;
    long long e1 = g * per_block + per_block;
    if (e1 > L) {
        e1 = L;
    }
    Run run;
    run.init();
    // The moment kernels pass no shift: every run finds its own.
    const acc_t s = shift ? shift[c] : (acc_t)0;
    if (e < e1) {
        long long a = e / B;
        long long b = e - a * B;
        const long long step_a = (long long)blockDim.x / B;
        const long long step_b = (long long)blockDim.x - step_a * B;
        long long off = a * CB + c * B + b;
        const long long doff = step_a * CB + step_b;
        for (; e < e1; e += blockDim.x) {
            run.push(x, gy, off, s);
            b += step_b;
            off += doff;
            if (b >= B) {
                b -= B;
                off += CB - B;
            }
        }
    }
    run.fold();
    sh[threadIdx.x] = run.t;
    __syncthreads();
    mnbn_reduce_rows(sh, 0, (int)threadIdx.x, 1, (int)blockDim.x);
    if (threadIdx.x == 0) {
        partial[g * C + c] = sh[0];
    }
}

// Narrow layout (B < NARROW_INNER): the K = C * B columns of a row are
// contiguous. Thread t reads column blockIdx.x * W + t % W of rows
// blockIdx.y * R + t / W, stepping R * gridDim.y rows (R = blockDim.x / W).
// Writes partial[blockIdx.y * K + column].
template <class Run, class P>
__device__ __forceinline__ void mnbn_narrow(
        const in_t* x, const in_t* gy, const acc_t* shift, long long A,
        long long K, long long B, int W, P* partial) {
    __shared__ P sh[256];
    const int R = (int)blockDim.x / W;
    const int w = (int)threadIdx.x % W;
    const int r = (int)threadIdx.x / W;
    const long long col = (long long)blockIdx.x * W + w;
    Run run;
    run.init();
    if (r < R && col < K) {
        const acc_t s = shift ? shift[col / B] : (acc_t)0;
        const long long step = (long long)R * gridDim.y;
        for (long long a = (long long)blockIdx.y * R + r; a < A; a += step) {
            run.push(x, gy, a * K + col, s);
        }
    }
    run.fold();
    if (r < R) {
        sh[r * W + w] = run.t;
    }
    __syncthreads();
    mnbn_reduce_rows(sh, w, r, W, R);
    if (r == 0 && col < K) {
        partial[(long long)blockIdx.y * K + col] = sh[w];
    }
}

// One warp per channel combines partial[(g * C + c) * P + p] over g < G and
// p < P. Returns the combination on lane 0 of each warp (valid when the
// channel c < C). Every thread of the block must call it.
template <class P>
__device__ __forceinline__ P mnbn_finalize(const P* partial, long long G,
                                           long long C, long long P_,
                                           long long* channel) {
    __shared__ P sh[128];
    const int warps = (int)blockDim.x / 32;
    const int lane = (int)threadIdx.x % 32;
    const int warp = (int)threadIdx.x / 32;
    const long long c = (long long)blockIdx.x * warps + warp;
    P t;
    mnbn_zero(t);
    if (c < C) {
        const long long n = G * P_;
        for (long long j = lane; j < n; j += 32) {
            const long long g = j / P_;
            const long long p = j - g * P_;
            mnbn_merge(t, partial[(g * C + c) * P_ + p]);
        }
    }
    sh[lane * warps + warp] = t;
    __syncthreads();
    mnbn_reduce_rows(sh, warp, lane, warps, 32);
    *channel = c;
    return sh[warp];
}

extern "C" __global__ void mnbn_moments_wide(
        const in_t* x, long long A, long long C, long long B,
        long long per_block, Triple* partial) {
    mnbn_wide<MomentRun, Triple>(x, x, (const acc_t*)0, A, C, B, per_block,
                                 partial);
}

extern "C" __global__ void mnbn_moments_narrow(
        const in_t* x, long long A, long long K, long long B, int W,
        Triple* partial) {
    mnbn_narrow<MomentRun, Triple>(x, x, (const acc_t*)0, A, K, B, W,
                                   partial);
}

// moments[c] = (count, mean, m2); shift[c] = mean rounded to acc_t.
extern "C" __global__ void mnbn_moments_finalize(
        const Triple* partial, long long G, long long C, long long P,
        double* moments, acc_t* shift) {
    long long c;
    Triple t = mnbn_finalize<Triple>(partial, G, C, P, &c);
    if (threadIdx.x % 32 == 0 && c < C) {
        moments[3 * c] = t.n;
        moments[3 * c + 1] = t.mean;
        moments[3 * c + 2] = t.m2;
        shift[c] = (acc_t)t.mean;
    }
}

extern "C" __global__ void mnbn_grad_wide(
        const in_t* gy, const in_t* x, const acc_t* shift, long long A,
        long long C, long long B, long long per_block, Pair* partial) {
    mnbn_wide<GradRun, Pair>(x, gy, shift, A, C, B, per_block, partial);
}

extern "C" __global__ void mnbn_grad_narrow(
        const in_t* gy, const in_t* x, const acc_t* shift, long long A,
        long long K, long long B, int W, Pair* partial) {
    mnbn_narrow<GradRun, Pair>(x, gy, shift, A, K, B, W, partial);
}

// sums[c] = sum gy, sums[C + c] = sum gy * (x - mean): the shifted sum
// corrected by the rounding remainder of the shift, in float64.
extern "C" __global__ void mnbn_grad_finalize(
        const Pair* partial, long long G, long long C, long long P,
        const double* mean, const acc_t* shift, double* sums) {
    long long c;
    Pair t = mnbn_finalize<Pair>(partial, G, C, P, &c);
    if (threadIdx.x % 32 == 0 && c < C) {
        sums[c] = t.g;
        sums[C + c] = t.gd - (mean[c] - (double)shift[c]) * t.g;
    }
}

// Thread i of the grid handles i, i + stride, ...; the channel of each
// index is tracked by additions only (no division per element).
struct ChannelWalk {
    long long i, c, r, sc, sr, stride;

    __device__ __forceinline__ void start(long long C, long long B) {
        stride = (long long)gridDim.x * blockDim.x;
        i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        const long long q = i / B;
        r = i - q * B;
        c = q % C;
        const long long sq = stride / B;
        sr = stride - sq * B;
        sc = sq % C;
    }
    __device__ __forceinline__ void next(long long C, long long B) {
        i += stride;
        r += sr;
        c += sc;
        if (r >= B) {
            r -= B;
            c += 1;
        }
        if (c >= C) {
            c -= C;
        }
    }
};

// y = (x - shift) * coef[c] + coef[C + c]
extern "C" __global__ void mnbn_normalize(
        const in_t* x, const acc_t* shift, const acc_t* coef, in_t* y,
        long long n, long long C, long long B) {
    ChannelWalk w;
    for (w.start(C, B); w.i < n; w.next(C, B)) {
        const acc_t v = mnbn_load(x, w.i) - shift[w.c];
        mnbn_store(y, w.i, v * coef[w.c] + coef[C + w.c]);
    }
}

// gx = coef[c] * (gy + coef[C + c] * (x - shift) + coef[2 * C + c])
extern "C" __global__ void mnbn_input_gradient(
        const in_t* gy, const in_t* x, const acc_t* shift, const acc_t* coef,
        in_t* gx, long long n, long long C, long long B) {
    ChannelWalk w;
    for (w.start(C, B); w.i < n; w.next(C, B)) {
        const acc_t d = mnbn_load(x, w.i) - shift[w.c];
        const acc_t inner = mnbn_load(gy, w.i) + coef[C + w.c] * d
            + coef[2 * C + w.c];
        mnbn_store(gx, w.i, coef[w.c] * inner);
    }
}
'''

KERNEL_NAMES = (
    'mnbn_moments_wide', 'mnbn_moments_narrow', 'mnbn_moments_finalize',
    'mnbn_grad_wide', 'mnbn_grad_narrow', 'mnbn_grad_finalize',
    'mnbn_normalize', 'mnbn_input_gradient')

_C_TYPES = {'float16': 'half_t', 'float32': 'float', 'float64': 'double'}


def accumulation_dtype(dtype):
    """float16 is accumulated in float32, float32 and float64 in themselves.

    The rule of the whole statistics layer (:mod:`multinode_bn.statistics`
    uses this function).
    """
    dtype = numpy.dtype(dtype)
    return numpy.dtype(numpy.float32) if dtype.itemsize < 4 else dtype


def source_for(in_dtype, acc_dtype):
    """The CUDA source compiled for inputs of ``in_dtype`` accumulated in
    ``acc_dtype`` (exposed so that it can be checked with ``nvcc``)."""
    in_name = _C_TYPES[numpy.dtype(in_dtype).name]
    acc_name = _C_TYPES[numpy.dtype(acc_dtype).name]
    if acc_name == 'half_t':
        raise ValueError('float16 is never an accumulation dtype')
    # half_t is defined in SOURCE; a forward declaration lets the typedef
    # come first.
    head = ('struct half_t;\ntypedef {} in_t;\ntypedef {} acc_t;\n'
            '#define MNBN_CHUNK {}\n'.format(in_name, acc_name, int(CHUNK)))
    return head + SOURCE


def enabled():
    """Whether the statistics layer should use these kernels for CuPy
    arrays (``MULTINODE_BN_CUDA_KERNELS``, default on)."""
    value = os.environ.get('MULTINODE_BN_CUDA_KERNELS', '1').strip().lower()
    return value not in ('0', 'off', 'false', 'no')


def _cupy():
    import cupy
    return cupy


_modules = {}
_sm_counts = {}


def _kernels(cupy, in_dtype, acc_dtype):
    """Compiled kernels for one dtype pair on the current device (cached)."""
    device = cupy.cuda.Device()
    key = (device.id, numpy.dtype(in_dtype).name,
           numpy.dtype(acc_dtype).name, CHUNK)
    kernels = _modules.get(key)
    if kernels is None:
        module = cupy.RawModule(code=source_for(in_dtype, acc_dtype))
        kernels = {name: module.get_function(name) for name in KERNEL_NAMES}
        _modules[key] = kernels
    return kernels


def _resident_blocks(cupy):
    """Blocks of :data:`THREADS` the device runs at once (about)."""
    device = cupy.cuda.Device()
    count = _sm_counts.get(device.id)
    if count is None:
        count = int(device.attributes['MultiProcessorCount'])
        _sm_counts[device.id] = count
    return count * (2048 // THREADS)


def _ceil_div(a, b):
    return -(-a // b)


def _i64(v):
    return numpy.int64(v)


class ShiftedInput(object):
    """``x3 - shift`` kept as the pair, for the kernels to subtract.

    What :func:`local_moments` and :func:`backward_sums` (here and in
    :mod:`multinode_bn.cpu_kernels`) return as ``centred``; the
    normalization and input gradient read ``x3`` and subtract a shift as
    they go.

    Attributes:
        x3: C-contiguous input, ``(A, C, B)``.
        shift: Per-channel shift ``(C,)``: in the accumulation dtype here;
            float64 from the C moments, whose normalization subtracts the
            global mean instead.
    """

    __slots__ = ('x3', 'shift')

    def __init__(self, x3, shift):
        self.x3 = x3
        self.shift = shift

    @property
    def shape(self):
        return self.x3.shape

    @property
    def dtype(self):
        return self.shift.dtype


def _reduce(cupy, kernels, kind, x3, gy3, shift, make_partial):
    """Launches the one-pass reduction ``kind`` (``'moments'``/``'grad'``).

    Returns ``(partial, G, P)``: the per-block partials laid out as
    ``(G, C, P)`` structs.
    """
    rows, channels, inner = x3.shape
    target = 2 * _resident_blocks(cupy)
    if inner >= NARROW_INNER:
        per_channel = rows * inner
        blocks = min(_ceil_div(target, channels),
                     _ceil_div(per_channel, THREADS * WIDE_VALUES_PER_THREAD),
                     65535)
        blocks = max(1, blocks)
        per_block = _ceil_div(per_channel, blocks)
        blocks = _ceil_div(per_channel, per_block)
        partial = make_partial(blocks * channels)
        args = (x3, _i64(rows), _i64(channels), _i64(inner),
                _i64(per_block), partial)
        if kind == 'grad':
            args = (gy3,) + args[:1] + (shift,) + args[1:]
        kernels['mnbn_{}_wide'.format(kind)](
            (channels, blocks), (THREADS,), args)
        return partial, blocks, 1
    columns = channels * inner
    width = min(columns, THREADS)
    rows_per_step = THREADS // width
    tiles = _ceil_div(columns, width)
    blocks = min(_ceil_div(target, tiles),
                 _ceil_div(rows, rows_per_step * NARROW_ROWS_PER_THREAD),
                 65535)
    blocks = max(1, blocks)
    partial = make_partial(blocks * columns)
    args = (x3, _i64(rows), _i64(columns), _i64(inner), numpy.int32(width),
            partial)
    if kind == 'grad':
        args = (gy3,) + args[:1] + (shift,) + args[1:]
    kernels['mnbn_{}_narrow'.format(kind)]((tiles, blocks), (THREADS,), args)
    return partial, blocks, inner


def _finalize_grid(channels):
    return (_ceil_div(channels, FINALIZE_THREADS // 32),)


def local_moments(x3, interm_dtype):
    """Count, mean and squared deviations of the local batch, per channel.

    The CuPy counterpart of :func:`multinode_bn.statistics.local_moments`:
    one pass over ``x3``, stable whatever the mean (see the module
    docstring).

    Args:
        x3 (cupy.ndarray): Input seen as ``(A, C, B)``.
        interm_dtype: Floating dtype of the computation (float16 is
            accumulated in float32).

    Returns:
        tuple: ``(moments, centred, shift)``: float64 ``(C, 3)`` array of
        ``(count, mean, m2)``, a :class:`ShiftedInput` for
        :func:`normalize_into`, and the per-channel shift (the local mean in
        the accumulation dtype).
    """
    cupy = _cupy()
    acc = accumulation_dtype(interm_dtype)
    x3 = cupy.ascontiguousarray(x3)
    rows, channels, inner = x3.shape
    if x3.size == 0:
        shift = cupy.zeros(channels, dtype=acc)
        moments = cupy.zeros((channels, 3), dtype=MOMENTS_DTYPE)
        return moments, ShiftedInput(x3, shift), shift
    moments = cupy.empty((channels, 3), dtype=MOMENTS_DTYPE)
    shift = cupy.empty(channels, dtype=acc)
    kernels = _kernels(cupy, x3.dtype, acc)
    partial, blocks, per = _reduce(
        cupy, kernels, 'moments', x3, None, None,
        lambda n: cupy.empty(n * _TRIPLE, dtype=MOMENTS_DTYPE))
    kernels['mnbn_moments_finalize'](
        _finalize_grid(channels), (FINALIZE_THREADS,),
        (partial, _i64(blocks), _i64(channels), _i64(per), moments, shift))
    return moments, ShiftedInput(x3, shift), shift


def normalize_into(centred, shift, mean, inv_std, gamma, beta):
    """``gamma * (x - mean) * inv_std + beta`` in the dtype of ``x``.

    The CuPy counterpart of :func:`multinode_bn.statistics.normalize_into`,
    one pass over ``x``.

    Args:
        centred (ShiftedInput): From :func:`local_moments`.
        shift: Its per-channel shift.
        mean, inv_std, gamma, beta: float64 ``(C,)`` arrays.

    Returns:
        cupy.ndarray: ``(A, C, B)`` output of the dtype of ``x``.
    """
    cupy = _cupy()
    # The shift the kernel subtracts must be the one in the offset.
    x3, shift = centred.x3, centred.shift
    acc = shift.dtype
    scale = gamma * inv_std
    offset = beta + (shift - mean) * scale
    coef = cupy.concatenate([scale, offset]).astype(acc)
    y3 = cupy.empty(x3.shape, dtype=x3.dtype)
    if x3.size == 0:
        return y3
    kernels = _kernels(cupy, x3.dtype, acc)
    _elementwise(kernels['mnbn_normalize'], x3,
                 (x3, shift, coef, y3, _i64(x3.size), _i64(x3.shape[1]),
                  _i64(x3.shape[2])))
    return y3


def backward_sums(gy3, x3, mean, interm_dtype):
    """Local ``(sum gy, sum gy * (x - mean))`` per channel, one pass.

    The CuPy counterpart of :func:`multinode_bn.statistics.backward_sums`.

    Args:
        gy3 (cupy.ndarray): Output gradient seen as ``(A, C, B)``.
        x3 (cupy.ndarray): Input seen as ``(A, C, B)``.
        mean (cupy.ndarray): float64 ``(C,)`` mean of the global batch.
        interm_dtype: Floating dtype of the computation.

    Returns:
        tuple: ``(sums, centred, shift)``; ``sums`` is float64 ``(2, C)``,
        ``centred`` a :class:`ShiftedInput` for :func:`input_gradient_into`
        and ``shift`` the mean rounded to the accumulation dtype.
    """
    cupy = _cupy()
    acc = accumulation_dtype(interm_dtype)
    x3 = cupy.ascontiguousarray(x3)
    gy3 = cupy.ascontiguousarray(gy3, dtype=x3.dtype)
    channels = x3.shape[1]
    shift = mean.astype(acc)
    if x3.size == 0:
        sums = cupy.zeros((2, channels), dtype=MOMENTS_DTYPE)
        return sums, ShiftedInput(x3, shift), shift
    sums = cupy.empty((2, channels), dtype=MOMENTS_DTYPE)
    kernels = _kernels(cupy, x3.dtype, acc)
    partial, blocks, per = _reduce(
        cupy, kernels, 'grad', x3, gy3, shift,
        lambda n: cupy.empty(n * _PAIR, dtype=MOMENTS_DTYPE))
    mean = cupy.ascontiguousarray(mean, dtype=MOMENTS_DTYPE)
    kernels['mnbn_grad_finalize'](
        _finalize_grid(channels), (FINALIZE_THREADS,),
        (partial, _i64(blocks), _i64(channels), _i64(per), mean, shift,
         sums))
    return sums, ShiftedInput(x3, shift), shift


def input_gradient_into(centred, gy3, a, b, c, out_dtype):
    """``gx = a * (gy + b * (x - shift) + c)``, one pass.

    The CuPy counterpart of
    :func:`multinode_bn.statistics.input_gradient_into`.

    Args:
        centred (ShiftedInput): From :func:`backward_sums`.
        gy3 (cupy.ndarray): Output gradient seen as ``(A, C, B)``.
        a, b, c: float64 ``(C,)`` coefficients of
            :func:`multinode_bn.statistics.input_gradient_coefficients`.
        out_dtype: dtype of the result.

    Returns:
        cupy.ndarray: ``gx`` seen as ``(A, C, B)``.
    """
    cupy = _cupy()
    x3, shift = centred.x3, centred.shift
    gy3 = cupy.ascontiguousarray(gy3, dtype=x3.dtype)
    coef = cupy.concatenate([a, b, c]).astype(shift.dtype)
    gx3 = cupy.empty(x3.shape, dtype=x3.dtype)
    if x3.size:
        kernels = _kernels(cupy, x3.dtype, shift.dtype)
        _elementwise(kernels['mnbn_input_gradient'], x3,
                     (gy3, x3, shift, coef, gx3, _i64(x3.size),
                      _i64(x3.shape[1]), _i64(x3.shape[2])))
    return gx3.astype(out_dtype, copy=False)


def _elementwise(kernel, x3, args):
    cupy = _cupy()
    blocks = min(_ceil_div(x3.size, THREADS), 8 * _resident_blocks(cupy))
    kernel((blocks,), (THREADS,), args)
