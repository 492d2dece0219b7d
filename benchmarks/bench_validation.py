"""Cost of the cross-rank checks on the fast path.

Run as ``mpiexec -n 2 python benchmarks/bench_validation.py``. Prints, per
shape, the median forward+backward time of one link in steady state, the
time of what the checks add to one call on the host (``begin_call``'s
input record, and for each of the two exchanges the digest of its identity,
its tag and the test of the summed tag; the tag adds 12 float64 values to
each exchange and no collective), and the time in
debug mode (a finiteness test of the local statistics per exchange, still
no extra collective).
"""

import statistics
import time
import warnings

import numpy

import chainer
from mpi4py import MPI

import multinode_bn
from multinode_bn import validation

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
        link_protocol = link._impl_selector.protocol

        def checks():
            call = link_protocol.begin_call(
                x, link.gamma, link.beta, None,
                (('eps', link.eps), ('decay', link.decay)))
            for kind in ('forward', 'backward'):
                tag = validation.exchange_tag(validation.exchange_digest(
                    (kind, call.identity)))
                validation.tag_agrees(tag)

        prepare = median_time(checks, comm, iterations=2000)
        with chainer.using_config('debug', True):
            debug = median_time(step, comm)
        rows.append((shape, fast, prepare, debug))
    if comm.rank == 0:
        print('{} processes; medians over {} iterations (slowest rank)'.format(
            comm.size, ITERATIONS))
        print('{:>20} {:>14} {:>16} {:>9} {:>14} {:>8}'.format(
            'shape per rank', 'fwd+bwd (ms)', 'checks (us)', 'share',
            'debug (ms)', 'x slower'))
        for shape, fast, prepare, debug in rows:
            print('{:>20} {:>14.3f} {:>16.1f} {:>8.1%} {:>14.3f} {:>8.2f}'.format(
                str(shape), fast * 1e3, prepare * 1e6, prepare / fast,
                debug * 1e3, debug / fast))


if __name__ == '__main__':
    main()
