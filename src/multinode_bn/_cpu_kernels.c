/* The four operations of multinode_bn.cpu_kernels (which documents their
 * arithmetic) over C-contiguous buffers seen as (A, C, B), C the channels, of
 * x's element type (float32 or float64). The loops release the GIL. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Several instruction-set versions of each loop, picked at load time. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__GLIBC__) && defined(__linux__)
#define MNBN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MNBN_CLONES
#endif
/* Ignored without OpenMP SIMD; the loops' sums are always t1 and t2. */
#define MNBN_SIMD_SUMS _Pragma("omp simd reduction(+:t1, t2)")
#define MNBN_SIMD _Pragma("omp simd")

/* Channels per block when channels are innermost (B == 1): 2 x 64 float64
 * accumulators fill the AVX-512 register file without spilling. */
#define MNBN_BLOCK 64
/* Element-wise loops read rows of more channels in order: a block's sweep
 * over rows 4 KiB apart and more thrashes the L1. */
#define MNBN_BLOCKED_MAX 256
/* Runs of one channel shorter than this (4 x 4 images) are summed per position
 * over blocks of MNBN_SHORT_BLOCK values, 3-5 times faster; 7 x 7 are not. */
#define MNBN_SHORT_RUN 17
#define MNBN_SHORT_BLOCK 512
#define MNBN_SHIFT_SAMPLE 16 /* leading values averaged for the shift */
/* The loop `name` for the element type of x, the buffer x_view. */
#define MNBN_LOOP(x_view, name) \
    ((x_view).itemsize == 4 ? name##_f4 : name##_f8)

#define T float
#define FN(name) name##_f4
#include "_cpu_kernels_loops.h"
#define T double
#define FN(name) name##_f8
#include "_cpu_kernels_loops.h"

/* Takes the buffer of `obj` into *v (C-contiguous, writable if `written`),
 * holding rows * C * cols values of `type`: 'f' float32, 'd' float64 (native
 * order), 0 either (x); else -1 with the error set. The count, a product in
 * double, is capped with room for its rounding: no byte count overflows. */
static int
take(Py_buffer *v, PyObject *obj, const char *name, Py_ssize_t rows,
     Py_ssize_t C, Py_ssize_t cols, char type, int written)
{
    if (rows < 0 || C < 0 || cols < 0 ||
            (double)rows * C * cols > PY_SSIZE_T_MAX / 16) {
        PyErr_Format(PyExc_ValueError, "invalid shape (%zd, %zd, %zd) of %s",
                     rows, C, cols, name);
        return -1;
    }
    if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT |
                           (written ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    const char *format = v->format ? v->format : "B";
    const char got = strcmp(format, "f") && strcmp(format, "d") ? 0 : *format;
    if (!got || (type && got != type) ||
            v->len != rows * C * cols * v->itemsize) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes of format '%s'; "
                     "expected %zd values of %s", name, v->len, format,
                     rows * C * cols, type == 'f' ? "float32 ('f')" :
                     type == 'd' ? "float64 ('d')" : "float32 or float64");
        return -1;
    }
    return 0;
}

/* Releases the buffers taken (obj set); None if the loop ran, else NULL. */
static PyObject *
finish(Py_buffer *v, int ran)
{
    for (int i = 0; i < 4; ++i)
        if (v[i].obj)
            PyBuffer_Release(&v[i]);
    if (!ran)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
local_moments(PyObject *self, PyObject *args)
{
    Py_ssize_t A, C, B;
    PyObject *x, *shift, *moments;
    double tolerance, *scratch = NULL;
    Py_buffer v[4] = {{0}};
    if (!PyArg_ParseTuple(args, "nnnOOOd", &A, &C, &B, &x, &shift, &moments,
                          &tolerance) || take(v, x, "x", A, C, B, 0, 0) ||
            take(v + 1, shift, "shift", 1, C, 1, 'd', 1) ||
            take(v + 2, moments, "moments", 3, C, 1, 'd', 1))
        return finish(v, 0);
    if (A == 0 || B == 0) { /* no values: zero moments */
        memset(v[2].buf, 0, v[2].len);
        return finish(v, 1);
    }
    if (!(scratch = PyMem_Malloc(2 * C * sizeof(double)))) {
        PyErr_NoMemory();
        return finish(v, 0);
    }
    Py_BEGIN_ALLOW_THREADS
    MNBN_LOOP(v[0], local_moments)(v[0].buf, A, C, B, tolerance, v[1].buf,
                                   v[2].buf, scratch);
    Py_END_ALLOW_THREADS
    PyMem_Free(scratch);
    return finish(v, 1);
}

static PyObject *
normalize(PyObject *self, PyObject *args)
{
    Py_ssize_t A, C, B;
    PyObject *x, *coef, *y;
    Py_buffer v[4] = {{0}};
    if (!PyArg_ParseTuple(args, "nnnOOO", &A, &C, &B, &x, &coef, &y) ||
            take(v, x, "x", A, C, B, 0, 0) ||
            take(v + 1, coef, "coef", 3, C, 1, *v->format, 0) ||
            take(v + 2, y, "y", A, C, B, *v->format, 1))
        return finish(v, 0);
    Py_BEGIN_ALLOW_THREADS
    MNBN_LOOP(v[0], normalize)(v[0].buf, A, C, B, v[1].buf, v[2].buf);
    Py_END_ALLOW_THREADS
    return finish(v, 1);
}

static PyObject *
backward_sums(PyObject *self, PyObject *args)
{
    Py_ssize_t A, C, B;
    PyObject *x, *gy, *mean, *sums;
    Py_buffer v[4] = {{0}};
    if (!PyArg_ParseTuple(args, "nnnOOOO", &A, &C, &B, &x, &gy, &mean,
                          &sums) || take(v, x, "x", A, C, B, 0, 0) ||
            take(v + 1, gy, "gy", A, C, B, *v->format, 0) ||
            take(v + 2, mean, "mean", 1, C, 1, 'd', 0) ||
            take(v + 3, sums, "sums", 2, C, 1, 'd', 1))
        return finish(v, 0);
    Py_BEGIN_ALLOW_THREADS
    MNBN_LOOP(v[0], backward_sums)(v[0].buf, v[1].buf, A, C, B, v[2].buf,
                                   v[3].buf);
    Py_END_ALLOW_THREADS
    return finish(v, 1);
}

static PyObject *
input_gradient(PyObject *self, PyObject *args)
{
    Py_ssize_t A, C, B;
    PyObject *x, *gy, *coef, *gx;
    Py_buffer v[4] = {{0}};
    if (!PyArg_ParseTuple(args, "nnnOOOO", &A, &C, &B, &x, &gy, &coef,
                          &gx) || take(v, x, "x", A, C, B, 0, 0) ||
            take(v + 1, gy, "gy", A, C, B, *v->format, 0) ||
            take(v + 2, coef, "coef", 4, C, 1, *v->format, 0) ||
            take(v + 3, gx, "gx", A, C, B, *v->format, 1))
        return finish(v, 0);
    Py_BEGIN_ALLOW_THREADS
    MNBN_LOOP(v[0], input_gradient)(v[0].buf, v[1].buf, A, C, B, v[2].buf,
                                    v[3].buf);
    Py_END_ALLOW_THREADS
    return finish(v, 1);
}

#define MNBN_METHOD(name, args) {#name, name, METH_VARARGS, #name args}
static PyMethodDef methods[] = {
    MNBN_METHOD(local_moments, "(A, C, B, x, shift, moments, tolerance)"),
    MNBN_METHOD(normalize, "(A, C, B, x, coef, y)"),
    MNBN_METHOD(backward_sums, "(A, C, B, x, gy, mean, sums)"),
    MNBN_METHOD(input_gradient, "(A, C, B, x, gy, coef, gx)"),
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
    "One-pass CPU loops of multinode_bn.cpu_kernels.", -1, methods};

PyMODINIT_FUNC
PyInit__cpu_kernels(void)
{
    return PyModule_Create(&module);
}
