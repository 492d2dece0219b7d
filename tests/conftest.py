"""Shared helpers: global batches, the single-process reference, counting."""

import warnings

import numpy
import pytest

import chainer
import chainer.links as L
from mpi4py import MPI

warnings.filterwarnings('ignore', category=DeprecationWarning)
warnings.filterwarnings('ignore', category=FutureWarning)


def world():
    return MPI.COMM_WORLD


def split_sizes(total_sizes, rank):
    """Offset and size of ``rank``'s part of the concatenated batch."""
    return sum(total_sizes[:rank]), total_sizes[rank]


def make_batches(seed, sizes, tail, dtype=numpy.float32, loc=0.0, scale=1.0):
    """Per-rank inputs and upstream gradients, identical on every rank."""
    rng = numpy.random.RandomState(seed)
    xs = [(loc + scale * rng.standard_normal((n,) + tuple(tail))).astype(dtype)
          for n in sizes]
    gys = [rng.standard_normal((n,) + tuple(tail)).astype(dtype)
           for n in sizes]
    return xs, gys


class Result(object):
    """Outputs, gradients and statistics of one forward/backward."""

    def __init__(self, y, gx, ggamma, gbeta, avg_mean, avg_var):
        self.y, self.gx = y, gx
        self.ggamma, self.gbeta = ggamma, gbeta
        self.avg_mean, self.avg_var = avg_mean, avg_var


def run_link(link, x, gy, **kwargs):
    xv = chainer.Variable(x)
    y = link(xv, **kwargs)
    link.cleargrads()
    y.grad = gy
    y.backward()
    gamma = getattr(link, 'gamma', None)
    beta = getattr(link, 'beta', None)
    return Result(y.array, xv.grad,
                  None if gamma is None else gamma.grad,
                  None if beta is None else beta.grad,
                  numpy.array(link.avg_mean), numpy.array(link.avg_var))


def reference(xs, gys, size=None, dtype=numpy.float64, steps=1, **kwargs):
    """``L.BatchNormalization`` on the concatenated batch, in one process.

    Inputs are promoted to ``dtype`` (float64 by default), so the reference
    is independent of the rounding of the code under test.
    """
    link = L.BatchNormalization(size, dtype=dtype, **kwargs)
    x = numpy.concatenate(xs).astype(dtype)
    gy = numpy.concatenate(gys).astype(dtype)
    for _ in range(steps):
        result = run_link(link, x, gy)
    return result


def assert_close(actual, expected, rtol, atol, what=''):
    numpy.testing.assert_allclose(
        numpy.asarray(actual, dtype=numpy.float64),
        numpy.asarray(expected, dtype=numpy.float64),
        rtol=rtol, atol=atol,
        err_msg='{} on rank {}'.format(what, MPI.COMM_WORLD.rank))


def assert_matches_reference(ours, ref, offset, n, size, rtol, atol,
                             params=True):
    """Our per-rank result against the slice of the global reference.

    Parameter gradients are compared after the data-parallel mean over the
    ``size`` processes; they equal the global gradient divided by ``size``.

    Collective: every rank makes the same MPI calls whatever fails, and
    every rank raises when any rank found a mismatch (a rank raising alone
    would leave the others waiting in the next test's collectives).
    """
    comm = MPI.COMM_WORLD
    checks = [('y', ours.y, ref.y[offset:offset + n]),
              ('gx', ours.gx, ref.gx[offset:offset + n])]
    if params:
        for name in ('ggamma', 'gbeta'):
            mine = getattr(ours, name)
            if mine is None:
                continue
            mean = comm.allreduce(numpy.asarray(mine, numpy.float64)) / size
            checks.append((name, mean * size, getattr(ref, name)))
    checks += [('avg_mean', ours.avg_mean, ref.avg_mean),
               ('avg_var', ours.avg_var, ref.avg_var)]
    failures = []
    for what, actual, expected in checks:
        try:
            assert_close(actual, expected, rtol, atol, what)
        except AssertionError as e:
            failures.append(str(e))
    failed_ranks = [r for r, f in enumerate(comm.allgather(bool(failures)))
                    if f]
    if failed_ranks:
        raise AssertionError('mismatch on rank(s) {}; this rank ({}): {}'.format(
            failed_ranks, comm.rank, '\n'.join(failures) or 'matched'))


COLLECTIVE_NAMES = (
    'Allreduce', 'allreduce', 'Iallreduce', 'Allgather', 'allgather',
    'Iallgather', 'Bcast', 'bcast', 'Reduce', 'reduce', 'Gather', 'gather',
    'Barrier', 'barrier', 'Ibarrier', 'Alltoall', 'alltoall', 'Scatter',
    'scatter', 'Reduce_scatter', 'Scan', 'Exscan', 'Allgatherv',
    'Iallgatherv', 'Send', 'Recv', 'send', 'recv', 'Isend', 'Irecv')


def _counting(name):
    def method(self, *args, **kwargs):
        self.calls.append(name)
        return getattr(MPI.Intracomm, name)(self, *args, **kwargs)
    method.__name__ = name
    return method


class CountingComm(MPI.Intracomm):
    """``MPI.COMM_WORLD`` (or a duplicate) that records every collective."""

    def __init__(self, comm=None):
        super().__init__()
        self.calls = []

    def __new__(cls, comm=None):
        return super().__new__(cls, MPI.COMM_WORLD if comm is None else comm)


for _name in COLLECTIVE_NAMES:
    setattr(CountingComm, _name, _counting(_name))


def _counting_idup(self, *args):
    # Links exchange on duplicates of the communicator: count there too.
    self.calls.append('Idup')
    dup, request = MPI.Intracomm.Idup(self, *args)
    counting = CountingComm(dup)
    counting.calls = self.calls
    return counting, request


CountingComm.Idup = _counting_idup


@pytest.fixture
def comm():
    return MPI.COMM_WORLD


@pytest.fixture(params=['loops', 'numpy'])
def cpu_path(request, monkeypatch):
    """Runs a test with the C loops of ``multinode_bn.cpu_kernels`` and
    with the NumPy code they replace."""
    from multinode_bn import cpu_kernels
    if request.param == 'loops':
        if not cpu_kernels.available():
            pytest.skip('multinode_bn._cpu_kernels was not built')
        monkeypatch.setenv('MULTINODE_BN_CPU_KERNELS', '1')
    else:
        monkeypatch.setenv('MULTINODE_BN_CPU_KERNELS', '0')
    return request.param
