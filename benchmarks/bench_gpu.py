"""Time of the statistics on a GPU (CuPy only; Chainer is not needed).

Run from the repository root on a machine with CuPy and a CUDA device::

    python benchmarks/bench_gpu.py

For each shape it times, with CUDA events, the four operations of the
statistics backend that runs on CuPy arrays
(:class:`multinode_bn.statistics.ReferenceStatistics`): local moments,
normalization, backward sums and input gradient; and, for comparison, a
device copy of the input (the memory-traffic unit). Median of 50 runs.
The correctness of the same code on CuPy is checked by the tests marked
``gpu`` (``pytest -m gpu``).
"""

import importlib.util
import os
import sys

import numpy

SHAPES = [(2, 64, 56, 56), (2, 256, 56, 56), (4, 2048, 7, 7),
          (32, 256, 14, 14), (256, 1024)]
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


def _statistics():
    # The statistics module alone: the package's __init__ imports Chainer.
    path = os.path.join(ROOT, 'src', 'multinode_bn', 'statistics.py')
    spec = importlib.util.spec_from_file_location('mnbn_statistics', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _median_ms(cupy, step, runs=50):
    for _ in range(3):
        step()
    times = []
    for _ in range(runs):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        step()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(numpy.median(times))


def main():
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no CuPy, or no device
        print('bench_gpu: needs CuPy and a CUDA device ({})'.format(e))
        return 3
    statistics = _statistics()
    print('statistics on CuPy {}, {}; float32, ms (median of 50)'.format(
        cupy.__version__, cupy.cuda.runtime.getDeviceProperties(0)[
            'name'].decode()))
    print('{:<18} {:>8} {:>10} {:>10} {:>10} {:>8}'.format(
        'shape', 'moments', 'normalize', 'bw sums', 'gx', 'copy'))
    for shape in SHAPES:
        axis = (0,) + tuple(range(2, len(shape)))
        x = cupy.random.standard_normal(shape, dtype=numpy.float32)
        gy = cupy.random.standard_normal(shape, dtype=numpy.float32)
        layout = statistics.Layout(x, axis)
        x3, gy3 = layout.view(x), layout.view(gy)
        stats = statistics.ReferenceStatistics(cupy, numpy.float32)
        c = shape[1]
        mean = cupy.zeros(c)
        ones = cupy.ones(c)
        times = [
            _median_ms(cupy, lambda: stats.local_moments(x3)),
            _median_ms(cupy, lambda: stats.normalize(x3, mean, ones, mean,
                                                     numpy.float32)),
            _median_ms(cupy, lambda: stats.backward_sums(x3, gy3, mean)),
            _median_ms(cupy, lambda: stats.input_gradient(
                x3, gy3, mean, ones, ones, mean, numpy.float32)),
            _median_ms(cupy, lambda: x.copy()),
        ]
        print('{:<18} {:>8.3f} {:>10.3f} {:>10.3f} {:>10.3f} {:>8.3f}'.format(
            str(shape), *times))
    return 0


if __name__ == '__main__':
    sys.exit(main())
