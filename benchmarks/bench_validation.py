"""Cost of the cross-rank input check on the fast path.

Run as ``mpiexec -n 2 python benchmarks/bench_validation.py``. Prints, per
shape, the median forward+backward time of one link in steady state (input
check inside the statistics exchange), the time of the Python-side
preparation alone, and the time in debug mode (a header exchange and a
finiteness exchange per call).
"""

import statistics
import time
import warnings

import numpy

import chainer
from mpi4py import MPI

import multinode_bn

warnings.simplefilter('ignore')
SHAPES = [(16, 64, 32, 32), (256, 1024), (4, 8)]
ITERATIONS = 60


def median_time(fn, comm, iterations=ITERATIONS):
    for _ in range(5):
        fn()
    times = []
    for _ in range(iterations):
        comm.Barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    # every rank reports its median; the slowest rank is what a job sees
    return comm.allreduce(statistics.median(times), op=MPI.MAX)


def main():
    comm = MPI.COMM_WORLD
    rows = []
    for shape in SHAPES:
        x = numpy.random.RandomState(comm.rank).randn(*shape).astype(
            numpy.float32)
        gy = numpy.ones_like(x)
        link = multinode_bn.MultiNodeBatchNormalization(shape[1], comm)

        def step():
            y = link(x)
            link.cleargrads()
            y.grad = gy
            y.backward()

        fast = median_time(step, comm)
        selector = link._impl_selector
        prepare = median_time(
            lambda: selector.prepare(x, link.gamma, link.beta, None), comm,
            iterations=2000)
        with chainer.using_config('debug', True):
            debug = median_time(step, comm)
        rows.append((shape, fast, prepare, debug))
    if comm.rank == 0:
        print('{} processes; medians over {} iterations (slowest rank)'.format(
            comm.size, ITERATIONS))
        print('{:>20} {:>14} {:>16} {:>9} {:>14} {:>8}'.format(
            'shape per rank', 'fwd+bwd (ms)', 'check prep (us)', 'share',
            'debug (ms)', 'x slower'))
        for shape, fast, prepare, debug in rows:
            print('{:>20} {:>14.3f} {:>16.1f} {:>8.1%} {:>14.3f} {:>8.2f}'.format(
                str(shape), fast * 1e3, prepare * 1e6, prepare / fast,
                debug * 1e3, debug / fast))


if __name__ == '__main__':
    main()
