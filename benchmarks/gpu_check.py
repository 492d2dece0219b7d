"""Checks the GPU paths of multinode_bn on a machine with one GPU.

Run from the repository root (``benchmarks/gpu_check.sh`` prepares the
environment and runs it twice, see ``docs/gpu.md``)::

    python benchmarks/gpu_check.py                       # everything
    python benchmarks/gpu_check.py --sections kernels     # CuPy only
    python benchmarks/gpu_check.py --device cpu --sections link,mpi
                                                         # self-test on CPU

Sections:

``kernels``
    The CuPy kernels of :mod:`multinode_bn.cuda_kernels` against float64
    NumPy: local moments, normalization, backward sums and input gradient,
    for the usual layouts and dtypes, a large mean (``1e4 + N(0, 1)`` in
    float32: variance within 1%), an outlier as the first value, NaN
    propagation, empty and non-contiguous inputs, bit-reproducibility; and
    (unless ``--quick``) the kernels' bandwidth against the generic CuPy
    code of :mod:`multinode_bn.statistics`. Needs CuPy only: the two modules
    are loaded without the package ``__init__`` (which imports Chainer).
``link``
    ``MultiNodeBatchNormalization`` on the device (one process) against
    ``L.BatchNormalization`` in float64 on the CPU: float32, float16,
    mixed16, float64, ``use_gamma=False``, channels-last, ``(N, C)``, a
    large mean, ``to_device`` round trips and a converted model.
``mpi``
    Two MPI processes sharing the GPU, ``'mpi'`` backend (statistics staged
    through host memory), uneven batches, against the concatenated batch.
``nccl``
    A one-process ``PureNcclCommunicator``: the link selects ``'nccl'``, and
    the NCCL exchange is driven through ``ncclAllReduce`` (a one-rank sum)
    to check its buffers, stream and results.
``timing``
    Forward + backward of our link, Chainer's ``L.BatchNormalization``
    without cuDNN (the generic path our implementation replaces), with
    cuDNN (for information) and ChainerMN's
    ``MultiNodeBatchNormalization``, one process. Never fails.

Every section after ``kernels`` needs Chainer; when it cannot be imported
they are reported as SKIP with the reason, and the kernel rows still count.

Exit status: 0 when every check that ran passed, 1 when one failed, 3 when
no usable GPU was found (nothing checked; the reason is printed), 2 on a
usage error.
"""

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
import types

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.normpath(os.path.join(HERE, '..', 'src'))
SECTIONS = ('kernels', 'link', 'mpi', 'nccl', 'timing')
EXIT_FAIL = 1
EXIT_NO_GPU = 3
ROW_PREFIX = 'GPU_CHECK_ROW '


# --------------------------------------------------------------------------
# Report


class Report(object):
    """Rows of ``(section, check, status, detail)``; status is PASS, FAIL,
    SKIP or INFO."""

    def __init__(self):
        self.rows = []

    def add(self, section, check, status, detail=''):
        row = dict(section=section, check=check, status=status,
                   detail=detail)
        self.rows.append(row)
        return row

    def check(self, section, check, ok, detail=''):
        return self.add(section, check, 'PASS' if ok else 'FAIL', detail)

    def extend(self, rows):
        self.rows.extend(rows)

    def failed(self):
        return [r for r in self.rows if r['status'] == 'FAIL']

    def table(self):
        widths = [max([len(h)] + [len(str(r[k])) for r in self.rows])
                  for h, k in (('section', 'section'), ('check', 'check'),
                               ('status', 'status'))]
        lines = []
        head = '{:<{}}  {:<{}}  {:<{}}  {}'.format(
            'section', widths[0], 'check', widths[1], 'status', widths[2],
            'detail')
        lines.append(head)
        lines.append('-' * len(head))
        for r in self.rows:
            lines.append('{:<{}}  {:<{}}  {:<{}}  {}'.format(
                r['section'], widths[0], r['check'], widths[1], r['status'],
                widths[2], r['detail']))
        counts = {}
        for r in self.rows:
            counts[r['status']] = counts.get(r['status'], 0) + 1
        lines.append('-' * len(head))
        lines.append('  '.join('{} {}'.format(k, counts[k])
                               for k in ('PASS', 'FAIL', 'SKIP', 'INFO')
                               if k in counts))
        return '\n'.join(lines)


# --------------------------------------------------------------------------
# Imports that must work without Chainer


def load_statistics_layer():
    """``(statistics, cuda_kernels)`` of ``src/multinode_bn``.

    When the package cannot be imported as a whole (its ``__init__``
    imports Chainer), a bare package module is registered so that the two
    Chainer-free modules import on their own. :func:`forget_statistics_layer`
    undoes that before the real package is imported.
    """
    if SRC not in sys.path:
        sys.path.insert(0, SRC)
    if 'multinode_bn' not in sys.modules:
        package = types.ModuleType('multinode_bn')
        package.__path__ = [os.path.join(SRC, 'multinode_bn')]
        package.__bare__ = True
        sys.modules['multinode_bn'] = package
    statistics = importlib.import_module('multinode_bn.statistics')
    cuda_kernels = importlib.import_module('multinode_bn.cuda_kernels')
    return statistics, cuda_kernels


def forget_statistics_layer():
    package = sys.modules.get('multinode_bn')
    if package is not None and getattr(package, '__bare__', False):
        for name in list(sys.modules):
            if name == 'multinode_bn' or name.startswith('multinode_bn.'):
                del sys.modules[name]


def probe_gpu():
    """``(cupy, description)`` or ``(None, reason)``."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a CuPy/NumPy mismatch
        return None, 'CuPy cannot be imported: {}: {}'.format(
            type(e).__name__, e)
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return None, 'no CUDA device ({}: {})'.format(type(e).__name__, e)
    if count < 1:
        return None, 'no CUDA device (device count 0)'
    try:
        value = int(cupy.arange(10).sum())
        if value != 45:
            return None, 'a trivial CuPy reduction returned {}'.format(value)
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props['name']
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception as e:
        return None, 'CuPy cannot run a kernel: {}: {}'.format(
            type(e).__name__, e)
    text = '{} ({} device(s)), CuPy {}, NumPy {}, CUDA runtime {}'
    return cupy, text.format(
        name, count, cupy.__version__, numpy.__version__,
        cupy.cuda.runtime.runtimeGetVersion())


# --------------------------------------------------------------------------
# Kernels against float64 NumPy

# (name, shape, reduced axes)
LAYOUTS = [
    ('NCHW', (6, 8, 9, 9), (0, 2, 3)),
    ('NCHW B=33', (5, 7, 33), (0, 2)),
    ('N=1 NCHW', (1, 5, 40), (0, 2)),
    ('(N, C)', (300, 40), (0,)),
    ('(N, C) C=700', (20, 700), (0,)),
    ('NHWC', (4, 6, 6, 24), (0, 1, 2)),
    ('(N, C, 3)', (50, 10, 3), (0, 2)),
    ('(2, 3)', (2, 3), (0,)),
    # Many values per thread: runs of CHUNK values are folded mid-way.
    ('long channels', (4, 2, 40000), (0, 2)),
]
# (x dtype, interm dtype, loc): interm is promote(x, gamma).
DTYPES = [
    ('float32', 'float32', 0.0),
    ('float32', 'float32', 1e4),
    ('float64', 'float64', 1e4),
    ('float16', 'float16', 0.0),
    ('float16', 'float32', 3.0),
    ('float32', 'float64', 0.0),
]
# Relative tolerances by (x dtype, accumulation dtype): statistics, outputs.
TOLERANCES = {
    ('float16', 'float32'): (2e-5, 4e-3),
    ('float16', 'float64'): (1e-10, 4e-3),
    ('float32', 'float32'): (2e-5, 1e-4),
    ('float32', 'float64'): (1e-10, 1e-6),
    ('float64', 'float64'): (1e-10, 1e-10),
}


def reference_moments(x3):
    x = numpy.asarray(x3, dtype=numpy.float64)
    count = x.shape[0] * x.shape[2]
    mean = x.mean(axis=(0, 2))
    m2 = ((x - mean[None, :, None]) ** 2).sum(axis=(0, 2))
    return count, mean, m2


def reference_gradients(x3, gy3, mean, inv_std, gamma):
    x = numpy.asarray(x3, dtype=numpy.float64)
    gy = numpy.asarray(gy3, dtype=numpy.float64)
    x_hat = (x - mean[None, :, None]) * inv_std[None, :, None]
    sum_gy = gy.sum(axis=(0, 2))
    sum_gyd = (gy * (x - mean[None, :, None])).sum(axis=(0, 2))
    count = x.shape[0] * x.shape[2]
    gx = (gamma * inv_std)[None, :, None] * (
        gy - (sum_gy / count)[None, :, None]
        - x_hat * (sum_gyd * inv_std / count)[None, :, None])
    return sum_gy, sum_gyd, gx


def _max_rel(err, scale):
    scale = float(scale)
    return float(err) / scale if scale > 0 else float(err)


class KernelCheck(object):
    """One input through the four kernels, compared with float64 NumPy."""

    def __init__(self, cupy, ck, st):
        self.cupy, self.ck, self.st = cupy, ck, st

    def run(self, x, gy, axis, interm, eps=2e-5, gamma=None, beta=None):
        """Returns a dict of relative errors (and the outputs)."""
        cupy, ck, st = self.cupy, self.ck, self.st
        x3h = st.reduced_view(x, axis)
        gy3h = st.reduced_view(gy, axis)
        channels = x3h.shape[1]
        rng = numpy.random.RandomState(7)
        if gamma is None:
            gamma = rng.uniform(0.5, 1.5, channels)
        if beta is None:
            beta = rng.uniform(-1, 1, channels)
        count, mean_r, m2_r = reference_moments(x3h)
        var_r = m2_r / max(count, 1)
        inv_std_r = 1.0 / numpy.sqrt(var_r + eps)

        xd = cupy.asarray(x)
        gyd = cupy.asarray(gy)
        x3 = st.reduced_view(xd, axis)
        gy3 = st.reduced_view(gyd, axis)
        moments, centred, shift = ck.local_moments(x3, interm)
        m = cupy.asnumpy(moments)
        out = dict(moments=m, shift=cupy.asnumpy(shift))
        std = numpy.sqrt(var_r)
        out['count_ok'] = bool((m[:, 0] == count).all())
        out['mean'] = _max_rel(numpy.abs(m[:, 1] - mean_r).max(initial=0),
                               std.max(initial=0))
        out['m2'] = _max_rel(numpy.abs(m[:, 2] - m2_r).max(initial=0),
                             m2_r.max(initial=0))
        out['var_rel'] = float((numpy.abs(m[:, 2] - m2_r)
                                / numpy.where(m2_r > 0, m2_r, 1)).max(
                                    initial=0))

        # Normalize with our statistics; compare with the reference's.
        g = cupy.asarray(gamma, dtype=numpy.float64)
        b = cupy.asarray(beta, dtype=numpy.float64)
        mean = moments[:, 1]
        var = moments[:, 2] / max(count, 1)
        inv_std = 1.0 / cupy.sqrt(var + eps)
        y3 = ck.normalize_into(centred, shift, mean, inv_std, g, b)
        y_r = ((x3h.astype(numpy.float64) - mean_r[None, :, None])
               * (gamma * inv_std_r)[None, :, None] + beta[None, :, None])
        yh = cupy.asnumpy(y3)
        out['y_dtype_ok'] = yh.dtype == x.dtype and yh.shape == x3h.shape
        out['y'] = _max_rel(
            numpy.abs(yh.astype(numpy.float64) - y_r).max(initial=0),
            numpy.abs(y_r).max(initial=0))

        sums, centred_b, shift_b = ck.backward_sums(gy3, x3, mean, interm)
        sum_gy_r, sum_gyd_r, gx_r = reference_gradients(
            x3h, gy3h, mean_r, inv_std_r, gamma)
        s = cupy.asnumpy(sums)
        scale_gy = numpy.abs(gy3h.astype(numpy.float64)).sum(axis=(0, 2))
        scale_gyd = numpy.abs(gy3h.astype(numpy.float64) * (
            x3h.astype(numpy.float64) - mean_r[None, :, None])).sum(
                axis=(0, 2))
        out['sum_gy'] = _max_rel(
            numpy.abs(s[0] - sum_gy_r).max(initial=0),
            scale_gy.max(initial=0))
        out['sum_gyd'] = _max_rel(
            numpy.abs(s[1] - sum_gyd_r).max(initial=0),
            scale_gyd.max(initial=0))

        a, bb, c = st.input_gradient_coefficients(
            g, inv_std, sums, float(count), mean, shift_b)
        gx3 = ck.input_gradient_into(centred_b, gy3, a, bb, c, x.dtype)
        gxh = cupy.asnumpy(gx3)
        out['gx_dtype_ok'] = gxh.dtype == x.dtype and gxh.shape == x3h.shape
        # Relative to the terms gx is the difference of (it cancels to
        # nearly zero for tiny batches, where y hardly depends on x).
        out['gx'] = _max_rel(
            numpy.abs(gxh.astype(numpy.float64) - gx_r).max(initial=0),
            numpy.abs(gamma * inv_std_r).max(initial=0)
            * numpy.abs(gy3h.astype(numpy.float64)).max(initial=0))
        return out


def kernel_checks(cupy, ck, st, report, quick=False, timing=True):
    """Adds the ``kernels`` rows to ``report``."""
    section = 'kernels'
    check = KernelCheck(cupy, ck, st)
    rng = numpy.random.RandomState(0)
    layouts = LAYOUTS[:3] + LAYOUTS[3:6] if quick else LAYOUTS
    for x_dtype, interm, loc in DTYPES:
        acc = ck.accumulation_dtype(interm).name
        tol_stat, tol_out = TOLERANCES[(x_dtype, acc)]
        for name, shape, axis in layouts:
            x = (loc + rng.standard_normal(shape)).astype(x_dtype)
            gy = rng.standard_normal(shape).astype(x_dtype)
            label = '{} x{} acc {} mean {:g}'.format(
                name, x_dtype[5:], acc[5:], loc)
            try:
                r = check.run(x, gy, axis, numpy.dtype(interm))
            except Exception as e:
                report.check(section, label, False,
                             '{}: {}'.format(type(e).__name__, e))
                continue
            errors = {k: r[k] for k in ('mean', 'm2', 'y', 'sum_gy',
                                        'sum_gyd', 'gx')}
            bounds = dict(mean=tol_stat, m2=tol_stat, y=tol_out,
                          sum_gy=tol_stat, sum_gyd=tol_stat, gx=tol_out)
            if loc and x_dtype == 'float32' and acc == 'float32':
                # y and gx are float32 values of about 1 computed from data
                # of about 1e4: the data's own quantization is the limit.
                bounds['gx'] = bounds['y'] = 1e-3
            bad = [k for k in errors if not errors[k] <= bounds[k]]
            ok = (r['count_ok'] and r['y_dtype_ok'] and r['gx_dtype_ok']
                  and not bad)
            detail = ' '.join('{}={:.1e}'.format(k, v)
                              for k, v in errors.items())
            if bad:
                detail += ' (over: {})'.format(', '.join(bad))
            if not r['count_ok']:
                detail += ' (count wrong)'
            if not (r['y_dtype_ok'] and r['gx_dtype_ok']):
                detail += ' (output dtype/shape wrong)'
            report.check(section, label, ok, detail)

    # The stability requirement: float32 x = 1e4 + N(0, 1).
    x = (1e4 + rng.standard_normal((16, 4, 1024))).astype(numpy.float32)
    r = check.run(x, x, (0, 2), numpy.dtype(numpy.float32))
    report.check(section, 'float32 1e4+N(0,1): variance within 1%',
                 r['var_rel'] <= 0.01,
                 'relative variance error {:.1e}'.format(r['var_rel']))

    # The first value of every channel an outlier: the worst case for a
    # shift taken from the data.
    for name, shape, axis in (('wide', (8, 3, 256), (0, 2)),
                              ('narrow', (512, 3), (0,))):
        x = rng.standard_normal(shape).astype(numpy.float32)
        x3 = st.reduced_view(x, axis)
        x3[0, :, 0] = 1e4
        r = check.run(x, x, axis, numpy.dtype(numpy.float32))
        report.check(section, 'outlier first value ({})'.format(name),
                     r['var_rel'] <= 1e-4 and r['mean'] <= 1e-5,
                     'variance {:.1e}, mean {:.1e}'.format(r['var_rel'],
                                                           r['mean']))

    # NaN reaches the statistics of its channel only.
    for name, shape, axis in (('wide', (4, 3, 64), (0, 2)),
                              ('narrow', (64, 3), (0,))):
        x = rng.standard_normal(shape).astype(numpy.float32)
        x3h = st.reduced_view(x, axis)
        x3h[2, 1, 0] = numpy.nan
        moments, _, _ = ck.local_moments(
            st.reduced_view(cupy.asarray(x), axis), numpy.float32)
        m = cupy.asnumpy(moments)
        ok = (numpy.isnan(m[1, 1:]).all() and numpy.isfinite(m[0]).all()
              and numpy.isfinite(m[2]).all())
        report.check(section, 'NaN stays in its channel ({})'.format(name),
                     ok, 'moments {}'.format(m[:, 1:].round(3).tolist()))

    # Empty local batch.
    x = cupy.asarray(numpy.zeros((0, 5, 7), numpy.float32))
    moments, centred, shift = ck.local_moments(x, numpy.float32)
    y = ck.normalize_into(centred, shift, *(cupy.zeros(5) for _ in range(4)))
    sums, cb, sb = ck.backward_sums(x, x, cupy.zeros(5), numpy.float32)
    gx = ck.input_gradient_into(cb, x, *(cupy.zeros(5) for _ in range(3)),
                                out_dtype=numpy.float32)
    ok = (not cupy.asnumpy(moments).any() and not cupy.asnumpy(sums).any()
          and y.shape == (0, 5, 7) and gx.shape == (0, 5, 7))
    report.check(section, 'empty local batch', ok,
                 'zero moments and sums, empty outputs')

    # Non-contiguous input (a strided view).
    base = rng.standard_normal((6, 16, 10)).astype(numpy.float32)
    xd = cupy.asarray(base)[:, ::2]
    moments, _, _ = ck.local_moments(xd, numpy.float32)
    count, mean_r, m2_r = reference_moments(base[:, ::2])
    m = cupy.asnumpy(moments)
    err = float(numpy.abs(m[:, 2] - m2_r).max() / m2_r.max())
    report.check(section, 'non-contiguous input', err < 2e-5,
                 'm2 error {:.1e}'.format(err))

    # Bit-reproducible: a fixed reduction order.
    x = cupy.asarray(rng.standard_normal((32, 8, 300)).astype(
        numpy.float32))
    first = cupy.asnumpy(ck.local_moments(x, numpy.float32)[0])
    second = cupy.asnumpy(ck.local_moments(x, numpy.float32)[0])
    report.check(section, 'bit-reproducible moments',
                 bool((first == second).all()), 'two runs compared bitwise')

    if timing and not quick:
        kernel_bandwidth(cupy, ck, st, report)


def _time_gpu(cupy, fn, repeat=20):
    fn()
    cupy.cuda.Device().synchronize()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e-3)
    return float(numpy.median(times))


def kernel_bandwidth(cupy, ck, st, report):
    """INFO rows: each kernel's time and effective bandwidth, and the
    generic CuPy code of ``statistics`` for the same quantities."""
    section = 'kernels'
    rng = numpy.random.RandomState(1)
    for shape, axis in (((32, 256, 28, 28), (0, 2, 3)),
                        ((32, 28, 28, 256), (0, 1, 2)),
                        ((256, 1024), (0,))):
        for dtype in (numpy.float32, numpy.float16):
            x = cupy.asarray(rng.standard_normal(shape).astype(dtype))
            gy = cupy.asarray(rng.standard_normal(shape).astype(dtype))
            interm = numpy.dtype(numpy.float32)
            x3, gy3 = st.reduced_view(x, axis), st.reduced_view(gy, axis)
            channels = x3.shape[1]
            moments, centred, shift = ck.local_moments(x3, interm)
            ones = cupy.ones(channels)
            mean = moments[:, 1]
            _, cb, sb = ck.backward_sums(gy3, x3, mean, interm)
            nbytes = x.nbytes
            ours = [
                ('local_moments', 1, lambda: ck.local_moments(x3, interm)),
                ('normalize', 2, lambda: ck.normalize_into(
                    centred, shift, mean, ones, ones, ones)),
                ('backward_sums', 2, lambda: ck.backward_sums(
                    gy3, x3, mean, interm)),
                ('input_gradient', 3, lambda: ck.input_gradient_into(
                    cb, gy3, ones, ones, ones, x.dtype)),
            ]
            generic = {
                'local_moments': lambda: _generic_moments(st, cupy, x3,
                                                          interm),
                'backward_sums': lambda: _generic_backward(
                    st, cupy, gy3, x3, mean, interm),
            }
            parts = []
            for name, passes, fn in ours:
                t = _time_gpu(cupy, fn)
                text = '{} {:.0f} us {:.0f} GB/s'.format(
                    name, t * 1e6, passes * nbytes / t / 1e9)
                if name in generic:
                    tg = _time_gpu(cupy, generic[name])
                    text += ' (generic CuPy {:.0f} us)'.format(tg * 1e6)
                parts.append(text)
            report.add(section, 'bandwidth {} {}'.format(
                shape, numpy.dtype(dtype).name), 'INFO', '; '.join(parts))


def _generic_moments(st, cupy, x3, interm):
    # statistics' own CuPy branch, whatever its dispatch does.
    saved = os.environ.get('MULTINODE_BN_CUDA_KERNELS')
    os.environ['MULTINODE_BN_CUDA_KERNELS'] = '0'
    try:
        return st.local_moments(cupy, x3, interm)
    finally:
        _restore_env('MULTINODE_BN_CUDA_KERNELS', saved)


def _generic_backward(st, cupy, gy3, x3, mean, interm):
    saved = os.environ.get('MULTINODE_BN_CUDA_KERNELS')
    os.environ['MULTINODE_BN_CUDA_KERNELS'] = '0'
    try:
        return st.backward_sums(cupy, gy3, x3, mean, interm)
    finally:
        _restore_env('MULTINODE_BN_CUDA_KERNELS', saved)


def _restore_env(name, value):
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


# --------------------------------------------------------------------------
# Chainer


def install_import_shims():
    """What Chainer 7.8.1's import needs on Python 3.12 / NumPy 2.

    Only for this check: ``numpy.distutils`` (gone with Python 3.12 and
    NumPy 2) is read by Chainer's environment check for a macOS warning,
    and ``pkg_resources`` (setuptools < 81) for version warnings. Each shim
    is installed only when the real module is missing. Returns the names
    shimmed.
    """
    shimmed = []
    try:
        importlib.import_module('numpy.distutils.system_info')
    except Exception:
        distutils = types.ModuleType('numpy.distutils')
        system_info = types.ModuleType('numpy.distutils.system_info')
        system_info.get_info = lambda *args, **kwargs: {}
        distutils.system_info = system_info
        sys.modules['numpy.distutils'] = distutils
        sys.modules['numpy.distutils.system_info'] = system_info
        shimmed.append('numpy.distutils')
    if not hasattr(numpy, 'sctypes'):  # removed in NumPy 2
        numpy.sctypes = {
            'int': [numpy.int8, numpy.int16, numpy.int32, numpy.int64],
            'uint': [numpy.uint8, numpy.uint16, numpy.uint32, numpy.uint64],
            'float': [numpy.float16, numpy.float32, numpy.float64,
                      numpy.longdouble],
            'complex': [numpy.complex64, numpy.complex128,
                        numpy.clongdouble],
            'others': [bool, object, bytes, str, numpy.void]}
        shimmed.append('numpy.sctypes')
    try:
        importlib.import_module('pkg_resources')
    except Exception:
        pkg = types.ModuleType('pkg_resources')

        class DistributionNotFound(Exception):
            pass

        class VersionConflict(Exception):
            pass

        def require(*args, **kwargs):
            raise DistributionNotFound(args)

        pkg.DistributionNotFound = DistributionNotFound
        pkg.VersionConflict = VersionConflict
        pkg.require = require
        pkg.get_distribution = require
        sys.modules['pkg_resources'] = pkg
        shimmed.append('pkg_resources')
    return shimmed


def install_cublas_stub():
    """Chainer 7.8.1 counts CUDA as available only if ``from cupy.cuda
    import cublas`` works; batch normalization never calls cuBLAS, so when
    CuPy cannot load it (no libcublas) a placeholder module takes its place
    and raises on first use. Returns the reason, or ``None``."""
    try:
        import cupy
    except Exception:
        return None
    try:
        from cupy.cuda import cublas  # NOQA
        return None
    except Exception as e:
        reason = '{}: {}'.format(type(e).__name__, str(e).strip()[:120])

    def missing(name):
        raise ImportError('cuBLAS is not available to this check ({})'
                          .format(reason))

    stub = types.ModuleType('cupy.cuda.cublas')
    stub.__getattr__ = missing
    sys.modules['cupy.cuda.cublas'] = stub
    cupy.cuda.cublas = stub
    return reason


def import_chainer(device_kind):
    """``(modules, reason)``: a namespace of chainer, chainermn, MPI and
    multinode_bn, or ``None`` and why not."""
    shimmed = install_import_shims()
    if device_kind == 'gpu' and install_cublas_stub():
        shimmed.append('cupy.cuda.cublas')
    import warnings
    warnings.filterwarnings('ignore', category=DeprecationWarning)
    warnings.filterwarnings('ignore', category=FutureWarning)
    warnings.filterwarnings('ignore', message='.*may not be compatible.*')
    try:
        import chainer
        import chainer.links as L
        import chainermn
        from mpi4py import MPI
    except Exception as e:
        return None, 'Chainer stack cannot be imported: {}: {}'.format(
            type(e).__name__, e)
    forget_statistics_layer()
    if SRC not in sys.path:
        sys.path.insert(0, SRC)
    try:
        import multinode_bn
        from multinode_bn import communication
        from multinode_bn.functions import batch_normalization as fbn
    except Exception as e:
        return None, 'multinode_bn cannot be imported: {}: {}'.format(
            type(e).__name__, e)
    if device_kind == 'gpu':
        from chainer.backends import cuda
        if not cuda.available:
            return None, ('chainer.backends.cuda.available is False with '
                          'this CuPy: {!r}'.format(
                              getattr(cuda, '_resolution_error', None)))
        device = chainer.get_device('@cupy:0')
    else:
        device = chainer.get_device('@numpy')
    ns = types.SimpleNamespace(
        chainer=chainer, L=L, chainermn=chainermn, MPI=MPI,
        multinode_bn=multinode_bn, communication=communication, fbn=fbn,
        device=device, shims=shimmed)
    return ns, 'Chainer {}, shims: {}'.format(
        chainer.__version__, ', '.join(shimmed) or 'none')


def to_host(ns, a):
    return numpy.asarray(ns.chainer.backend.CpuDevice().send(a))


def run_step(ns, link, x, gy):
    """Forward and backward on ``link``'s device; host copies of
    ``(y, gx, ggamma, gbeta, avg_mean, avg_var)``."""
    chainer = ns.chainer
    xv = chainer.Variable(ns.device.send(x) if x is not None else x)
    y = link(xv)
    link.cleargrads()
    y.grad = ns.device.send(gy)
    y.backward()
    gamma = getattr(link, 'gamma', None)
    beta = getattr(link, 'beta', None)
    return dict(
        y=to_host(ns, y.array), gx=to_host(ns, xv.grad),
        ggamma=None if gamma is None else to_host(ns, gamma.grad),
        gbeta=None if beta is None else to_host(ns, beta.grad),
        avg_mean=to_host(ns, link.avg_mean),
        avg_var=to_host(ns, link.avg_var),
        on_device=type(y.array).__module__.split('.')[0])


def reference_step(ns, x, gy, channels, **kwargs):
    """``L.BatchNormalization`` in float64 on the CPU."""
    chainer = ns.chainer
    link = ns.L.BatchNormalization(channels, dtype=numpy.float64, **kwargs)
    xv = chainer.Variable(x.astype(numpy.float64))
    y = link(xv)
    link.cleargrads()
    y.grad = gy.astype(numpy.float64)
    y.backward()
    gamma = getattr(link, 'gamma', None)
    beta = getattr(link, 'beta', None)
    return dict(
        y=y.array, gx=xv.grad,
        ggamma=None if gamma is None else gamma.grad,
        gbeta=None if beta is None else beta.grad,
        avg_mean=link.avg_mean, avg_var=link.avg_var)


LINK_TOLERANCE = {'float16': 2e-2, 'float32': 2e-4, 'float64': 1e-9}

# (name, per-process shape tail after N, axis, x dtype, link dtype, loc,
#  link keyword arguments)
LINK_CASES = [
    ('float32 NCHW', (8, 5, 5), None, 'float32', None, 0.0, {}),
    ('float16', (8, 5, 5), None, 'float16', 'float16', 0.0, {}),
    ('mixed16', (8, 5, 5), None, 'float16', 'mixed16', 0.0, {}),
    ('float64', (8, 5, 5), None, 'float64', 'float64', 0.0, {}),
    ('use_gamma=False', (8, 5, 5), None, 'float32', None, 0.0,
     dict(use_gamma=False, use_beta=False)),
    ('channels-last', (5, 5, 8), (0, 1, 2), 'float32', None, 0.0, {}),
    ('(N, C)', (16,), None, 'float32', None, 0.0, {}),
    ('mean 1e4', (8, 5, 5), None, 'float32', None, 1e4, {}),
]


def make_link(ns, comm, channels, dtype, axis, kwargs, backend='auto'):
    chainer = ns.chainer
    if dtype == 'mixed16':
        dtype = chainer.mixed16
    elif dtype is not None:
        dtype = numpy.dtype(dtype)
    if axis is not None:
        kwargs = dict(kwargs, axis=axis)
    return ns.multinode_bn.MultiNodeBatchNormalization(
        channels, comm, dtype=dtype, communication_backend=backend,
        **kwargs)


def compare(ours, ref, tol, size=1, keys=None):
    """Largest error relative to the reference's largest value, per key."""
    errors = {}
    for key in keys or ('y', 'gx', 'ggamma', 'gbeta', 'avg_mean',
                        'avg_var'):
        a, b = ours.get(key), ref.get(key)
        if a is None or b is None:
            continue
        a = numpy.asarray(a, numpy.float64)
        b = numpy.asarray(b, numpy.float64)
        if key in ('ggamma', 'gbeta'):
            a = a * size  # data-parallel 1/size scale of parameter grads
        scale = max(float(numpy.abs(b).max(initial=0)), 1e-30)
        errors[key] = float(numpy.abs(a - b).max(initial=0)) / scale
    bad = [k for k, v in errors.items() if not v <= tol]
    return errors, bad


def _case_arrays(seed, sizes, tail, x_dtype, loc):
    rng = numpy.random.RandomState(seed)
    xs = [(loc + rng.standard_normal((n,) + tail)).astype(x_dtype)
          for n in sizes]
    gys = [rng.standard_normal((n,) + tail).astype(x_dtype) for n in sizes]
    return xs, gys


def _channels(tail, axis):
    shape = (1,) + tail
    axis = axis if axis is not None else (0,) + tuple(
        range(2, len(shape)))
    kept = [d for i, d in enumerate(shape) if i not in axis]
    return int(numpy.prod(kept)), axis


def link_checks(ns, report):
    section = 'link'
    comm = ns.MPI.COMM_SELF
    for name, tail, axis, x_dtype, dtype, loc, kwargs in LINK_CASES:
        channels, full_axis = _channels(tail, axis)
        xs, gys = _case_arrays(3, [6], tail, x_dtype, loc)
        ref_kwargs = dict(kwargs)
        if axis is not None:
            ref_kwargs['axis'] = axis
        try:
            link = make_link(ns, comm, channels, dtype, axis, kwargs)
            link.to_device(ns.device)
            ours = run_step(ns, link, xs[0], gys[0])
            ref = reference_step(ns, xs[0], gys[0], channels, **ref_kwargs)
        except Exception as e:
            report.check(section, name, False, '{}: {}'.format(
                type(e).__name__, e))
            continue
        tol = LINK_TOLERANCE[x_dtype]
        errors, bad = compare(ours, ref, tol)
        device_ok = ours['on_device'] == ('cupy' if ns.device.xp is not numpy
                                          else 'numpy')
        detail = ' '.join('{}={:.1e}'.format(k, v) for k, v in errors.items())
        detail += ' [{}]'.format(ours['on_device'])
        report.check(section, name, not bad and device_ok, detail)

    # to_device round trip: CPU -> device -> CPU -> device.
    try:
        xs, gys = _case_arrays(4, [6], (8, 5, 5), 'float32', 0.0)
        link = make_link(ns, comm, 8, None, None, {})
        cpu = ns.chainer.get_device('@numpy')
        first = run_step_on(ns, link, cpu, xs[0], gys[0])
        link.to_device(ns.device)
        second = run_step_on(ns, link, ns.device, xs[0], gys[0])
        link.to_device(cpu)
        third = run_step_on(ns, link, cpu, xs[0], gys[0])
        # Running statistics advance each call; y and gx must not change.
        errors, bad = compare(second, first, 2e-4, keys=('y', 'gx'))
        errors3, bad3 = compare(third, first, 2e-4, keys=('y', 'gx'))
        report.check(section, 'to_device round trip', not bad and not bad3,
                     'device vs cpu y={y:.1e} gx={gx:.1e}'.format(**errors))
    except Exception as e:
        report.check(section, 'to_device round trip', False,
                     '{}: {}'.format(type(e).__name__, e))

    # A converted model on the device (batch normalization only: cuBLAS,
    # which a convolution needs, may be missing from the check's CuPy).
    try:
        chainer, L = ns.chainer, ns.L
        rng = numpy.random.RandomState(5)
        model = chainer.Sequential(L.BatchNormalization(4),
                                   chainer.functions.relu,
                                   L.BatchNormalization(4))
        x = (2.0 + rng.standard_normal((5, 4, 6, 6))).astype(numpy.float32)
        expected = model(x).array
        converted = ns.multinode_bn.create_mnbn_model(model, comm)
        kinds = sorted(set(type(link).__name__
                           for link in converted.links(skipself=True)))
        converted.to_device(ns.device)
        xv = chainer.Variable(ns.device.send(x))
        y = converted(xv)
        y.grad = ns.device.send(numpy.ones(y.shape, numpy.float32))
        y.backward()
        err = float(numpy.abs(to_host(ns, y.array) - expected).max())
        report.check(section, 'create_mnbn_model + to_device',
                     err < 1e-4 and kinds == ['MultiNodeBatchNormalization']
                     and xv.grad is not None,
                     'y error {:.1e}, links {}, gx on {}'.format(
                         err, kinds, type(xv.grad).__module__.split('.')[0]))
    except Exception as e:
        report.check(section, 'create_mnbn_model + to_device', False,
                     '{}: {}'.format(type(e).__name__, e))


def run_step_on(ns, link, device, x, gy):
    saved = ns.device
    ns.device = device
    try:
        return run_step(ns, link, x, gy)
    finally:
        ns.device = saved


MPI_SIZES = [3, 5]


def mpi_worker(args):
    """One of two processes under ``mpiexec``: each runs its part of the
    global batch, rank 0 prints the rows."""
    ns, reason = import_chainer(args.device)
    MPI = ns.MPI if ns is not None else None
    if ns is None:
        from mpi4py import MPI
        if MPI.COMM_WORLD.rank == 0:
            print(ROW_PREFIX + json.dumps(dict(
                section='mpi', check='import', status='FAIL',
                detail=reason)), flush=True)
        return 1
    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    rows = []
    for name, tail, axis, x_dtype, dtype, loc, kwargs in LINK_CASES:
        channels, full_axis = _channels(tail, axis)
        sizes = MPI_SIZES[:size] + [2] * max(0, size - len(MPI_SIZES))
        xs, gys = _case_arrays(11, sizes, tail, x_dtype, loc)
        ref_kwargs = dict(kwargs)
        if axis is not None:
            ref_kwargs['axis'] = axis
        error = None
        try:
            link = make_link(ns, comm, channels, dtype, axis, kwargs,
                             backend='mpi')
            link.to_device(ns.device)
            ours = run_step(ns, link, xs[rank], gys[rank])
            ref = reference_step(ns, numpy.concatenate(xs),
                                 numpy.concatenate(gys), channels,
                                 **ref_kwargs)
            offset = sum(sizes[:rank])
            n = sizes[rank]
            ref_local = dict(ref, y=ref['y'][offset:offset + n],
                             gx=ref['gx'][offset:offset + n])
            # Parameter gradients: the data-parallel mean over processes.
            for key in ('ggamma', 'gbeta'):
                if ours.get(key) is not None:
                    ours[key] = comm.allreduce(
                        numpy.asarray(ours[key], numpy.float64)) / size
            errors, bad = compare(ours, ref_local, LINK_TOLERANCE[x_dtype],
                                  size=size)
            backend = link.communication_backend
        except Exception as e:
            error = '{}: {}'.format(type(e).__name__, e)
            errors, bad, backend = {}, ['exception'], None
        gathered = comm.gather((errors, bad, error, backend,
                                ours.get('on_device') if not error else None),
                               root=0)
        if rank == 0:
            worst = {}
            for errs, _, _, _, _ in gathered:
                for k, v in errs.items():
                    worst[k] = max(worst.get(k, 0.0), v)
            failures = [(r, b, e) for r, (_, b, e, _, _) in
                        enumerate(gathered) if b or e]
            backends = sorted(set(str(g[3]) for g in gathered))
            places = sorted(set(str(g[4]) for g in gathered))
            detail = ' '.join('{}={:.1e}'.format(k, v)
                              for k, v in worst.items())
            detail += ' [{} ranks, batches {}, backend {}, {}]'.format(
                size, sizes, '/'.join(backends), '/'.join(places))
            if failures:
                detail += ' failures: {}'.format(failures)
            rows.append(dict(section='mpi', check=name,
                             status='FAIL' if failures else 'PASS',
                             detail=detail))
    if rank == 0:
        for row in rows:
            print(ROW_PREFIX + json.dumps(row), flush=True)
    return 0


def mpi_checks(args, report):
    mpiexec = args.mpiexec or os.environ.get('MPIEXEC') or shutil.which(
        'mpiexec')
    if not mpiexec:
        report.add('mpi', 'two processes', 'SKIP', 'no mpiexec on PATH')
        return
    command = [mpiexec, '-n', '2', sys.executable, os.path.abspath(__file__),
               '--mpi-worker', '--device', args.device]
    try:
        proc = subprocess.run(command, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              timeout=args.mpi_timeout,
                              universal_newlines=True)
    except subprocess.TimeoutExpired as e:
        report.check('mpi', 'two processes', False,
                     'timed out after {} s: {}'.format(
                         args.mpi_timeout, _tail(e.output)))
        return
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith(ROW_PREFIX):
            rows.append(json.loads(line[len(ROW_PREFIX):]))
    if not rows or proc.returncode != 0:
        report.check('mpi', 'two processes', False,
                     'exit {}: {}'.format(proc.returncode,
                                          _tail(proc.stdout)))
    report.extend(rows)


def _tail(text, n=600):
    text = (text or '')
    if isinstance(text, bytes):
        text = text.decode(errors='replace')
    return text[-n:].replace('\n', ' | ')


def nccl_checks(ns, report):
    section = 'nccl'
    if ns.device.xp is numpy:
        report.add(section, 'pure_nccl communicator', 'SKIP',
                   'needs the GPU (--device gpu)')
        return
    import cupy
    try:
        comm = ns.chainermn.create_communicator('pure_nccl')
    except Exception as e:
        report.add(section, 'pure_nccl communicator', 'SKIP',
                   'cannot create one: {}: {}'.format(type(e).__name__, e))
        return
    # The link picks NCCL and runs (one process: no collective).
    try:
        xs, gys = _case_arrays(6, [6], (8, 5, 5), 'float32', 0.0)
        link = make_link(ns, comm, 8, None, None, {})
        link.to_device(ns.device)
        ours = run_step(ns, link, xs[0], gys[0])
        ref = reference_step(ns, xs[0], gys[0], 8)
        errors, bad = compare(ours, ref, LINK_TOLERANCE['float32'])
        report.check(section, 'link selects nccl and matches',
                     not bad and link.communication_backend == 'nccl',
                     'backend {} '.format(link.communication_backend)
                     + ' '.join('{}={:.1e}'.format(k, v)
                                for k, v in errors.items()))
    except Exception as e:
        report.check(section, 'link selects nccl and matches', False,
                     '{}: {}'.format(type(e).__name__, e))
    # The exchange through ncclAllReduce: a one-rank sum is the identity.
    try:
        from multinode_bn import validation
        exchange = ns.communication.NcclStatsExchange(comm)
        exchange.size = 2  # skip the one-process shortcut
        rng = numpy.random.RandomState(8)
        host = numpy.stack([numpy.full(6, 10.0), rng.standard_normal(6),
                            rng.uniform(1, 2, 6) * 10], axis=1)
        moments = cupy.asarray(host)
        header = validation.inband_header((3, 4), validation.OK)
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            merged, summed = exchange.allreduce_moments(moments, header)
            first = cupy.asnumpy(exchange.allreduce_sum(
                cupy.asarray(host[:, :2].T.copy())))
            pointers = _buffer_pointers(exchange)
            for _ in range(3):
                exchange.allreduce_sum(cupy.asarray(host[:, :2].T.copy()))
                exchange.allreduce_moments(moments, header)
            again = _buffer_pointers(exchange)
        stream.synchronize()
        merged = cupy.asnumpy(merged)
        ok_values = (numpy.allclose(merged, host, rtol=1e-12, atol=1e-12)
                     and numpy.allclose(first, host[:, :2].T)
                     and validation.inband_agrees(numpy.asarray(summed)))
        report.check(section, 'ncclAllReduce on a side stream', ok_values,
                     'moments, sums and header survive a one-rank sum')
        report.check(section, 'buffers reused', pointers == again,
                     '{} buffer(s), same device pointers after 3 more '
                     'calls'.format(len(pointers)))
    except Exception as e:
        report.check(section, 'ncclAllReduce on a side stream', False,
                     '{}: {}'.format(type(e).__name__, e))


def _buffer_pointers(exchange):
    return sorted((str(k), int(v.data.ptr))
                  for k, v in getattr(exchange, '_buffers', {}).items())


TIMING_SHAPES = [(16, 64, 32, 32), (32, 256, 14, 14), (256, 1024),
                 (32, 64, 56, 56)]


def timing_checks(ns, report, quick=False):
    section = 'timing'
    chainer, L = ns.chainer, ns.L
    xp = ns.device.xp
    comm = ns.MPI.COMM_SELF
    try:
        mn_comm = ns.chainermn.create_communicator('naive')
    except Exception as e:
        mn_comm = None
        report.add(section, 'ChainerMN communicator', 'SKIP',
                   '{}: {}'.format(type(e).__name__, e))
    shapes = TIMING_SHAPES[:2] if quick else TIMING_SHAPES
    repeat = 5 if quick else 30
    for shape in shapes:
        for dtype in (numpy.float32, numpy.float16):
            channels = shape[1]
            rng = numpy.random.RandomState(9)
            x = ns.device.send(rng.standard_normal(shape).astype(dtype))
            gy = ns.device.send(rng.standard_normal(shape).astype(dtype))
            link_dtype = chainer.mixed16 if dtype == numpy.float16 else None
            links = [('ours', ns.multinode_bn.MultiNodeBatchNormalization(
                channels, comm, dtype=link_dtype), 'never'),
                ('L.BN generic', L.BatchNormalization(
                    channels, dtype=link_dtype), 'never')]
            if xp is not numpy:
                links.append(('L.BN cuDNN', L.BatchNormalization(
                    channels, dtype=link_dtype), 'always'))
            if mn_comm is not None:
                links.append(('ChainerMN', ns.chainermn.links
                              .MultiNodeBatchNormalization(
                                  channels, mn_comm, dtype=link_dtype),
                              'never'))
            times = {}
            for name, link, cudnn in links:
                link.to_device(ns.device)
                try:
                    times[name] = _time_step(ns, link, x, gy, cudnn, repeat)
                except Exception as e:
                    times[name] = None
                    report.add(section, '{} {}'.format(name, shape), 'SKIP',
                               '{}: {}'.format(type(e).__name__, e)[:200])
            base = times.get('L.BN generic')
            parts = []
            for name, _, _ in links:
                t = times.get(name)
                if t is None:
                    continue
                text = '{} {:.0f} us'.format(name, t * 1e6)
                if base and name != 'L.BN generic':
                    text += ' ({:.2f}x)'.format(t / base)
                parts.append(text)
            report.add(section, '{} {}'.format(shape,
                                               numpy.dtype(dtype).name),
                       'INFO', '; '.join(parts))


def _time_step(ns, link, x, gy, cudnn, repeat):
    chainer = ns.chainer
    xp = ns.device.xp

    def sync():
        if xp is not numpy:
            xp.cuda.Device().synchronize()

    def step():
        xv = chainer.Variable(x)
        y = link(xv)
        y.grad = gy
        y.backward()

    with chainer.using_config('use_cudnn', cudnn):
        for _ in range(3):
            step()
        sync()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
    return float(numpy.median(times))


# --------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Check the GPU paths of multinode_bn (see docs/gpu.md).')
    parser.add_argument('--sections', default=','.join(SECTIONS),
                        help='comma-separated subset of {} (default: '
                        'all)'.format(', '.join(SECTIONS)))
    parser.add_argument('--device', choices=('gpu', 'cpu'), default='gpu',
                        help="'cpu' runs the Chainer sections with NumPy "
                        '(a self-test of this script on a machine without '
                        'a GPU); the kernel section needs the GPU')
    parser.add_argument('--quick', action='store_true',
                        help='fewer cases, no bandwidth rows, short timing')
    parser.add_argument('--json', metavar='PATH',
                        help='also write the rows to PATH as JSON')
    parser.add_argument('--mpiexec', help='mpiexec to start the two-process'
                        ' check (default: $MPIEXEC or mpiexec on PATH)')
    parser.add_argument('--mpi-timeout', type=float, default=300.0)
    parser.add_argument('--mpi-worker', action='store_true',
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(',') if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error('unknown section(s): {}'.format(', '.join(unknown)))
    args.sections = sections
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.mpi_worker:
        return mpi_worker(args)
    report = Report()
    print('multinode_bn GPU check: Python {}, NumPy {}'.format(
        sys.version.split()[0], numpy.__version__), flush=True)

    cupy = None
    if args.device == 'gpu':
        cupy, text = probe_gpu()
        if cupy is None:
            print('No GPU available: {}. Nothing was checked (exit {}).'
                  .format(text, EXIT_NO_GPU), flush=True)
            return EXIT_NO_GPU
        print('GPU: ' + text, flush=True)
    elif 'kernels' in args.sections:
        report.add('kernels', 'CuPy kernels', 'SKIP',
                   '--device cpu: the kernels need a GPU')

    if 'kernels' in args.sections and cupy is not None:
        statistics, cuda_kernels = load_statistics_layer()
        try:
            kernel_checks(cupy, cuda_kernels, statistics, report,
                          quick=args.quick)
        except Exception as e:
            report.check('kernels', 'kernel checks', False,
                         'aborted: {}: {}'.format(type(e).__name__, e))

    chainer_sections = [s for s in args.sections if s != 'kernels']
    if chainer_sections:
        ns, text = import_chainer(args.device)
        print(text, flush=True)
        if ns is None:
            for s in chainer_sections:
                report.add(s, 'all', 'SKIP', text)
        else:
            for s in chainer_sections:
                try:
                    if s == 'link':
                        link_checks(ns, report)
                    elif s == 'mpi':
                        mpi_checks(args, report)
                    elif s == 'nccl':
                        nccl_checks(ns, report)
                    elif s == 'timing':
                        timing_checks(ns, report, quick=args.quick)
                except Exception as e:
                    report.check(s, 'section', False, 'aborted: {}: {}'.format(
                        type(e).__name__, e))

    print()
    print(report.table(), flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report.rows, f, indent=1)
    return EXIT_FAIL if report.failed() else 0


if __name__ == '__main__':
    sys.exit(main())
