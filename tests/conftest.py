"""Shared helpers: global batches, the single-process reference, checks
that fail on every rank together, counting."""

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


class on_every_rank(object):
    """Checks that fail on every rank together.

    A rank that raised alone would leave the others waiting in their next
    collective (this test's or the next one's). Each rank runs its own
    checks in the block; at its end every rank learns which ranks failed,
    and every rank raises ``AssertionError`` naming them, with this rank's
    messages::

        with on_every_rank() as ranks:
            ranks.check(assert_close, y, expected, 1e-9, 1e-9, 'y')
            assert link.N == 1

    ``ranks.check(f, *args)`` runs one check and goes on if it fails, so
    that every failure is reported; an exception raised in the block itself
    (a failed ``assert``, ``pytest.raises`` that saw nothing) ends the block
    on this rank and is its failure. Collective over ``comm``
    (``MPI.COMM_WORLD`` by default): every rank of it reaches the end of the
    block, so collectives inside the block go in ``ranks.check`` or before
    any plain ``assert``.
    """

    # What a failing check raises: any error, and pytest.fail's exception.
    FAILURES = (Exception, pytest.fail.Exception)

    def __init__(self, comm=None):
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.failures = []

    def check(self, check, *args, **kwargs):
        try:
            check(*args, **kwargs)
        except self.FAILURES as e:
            self.failures.append(self._message(e))

    @staticmethod
    def _message(error):
        if isinstance(error, AssertionError):
            return str(error)
        return '{}: {}'.format(type(error).__name__, error)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is not None:
            if not isinstance(error, self.FAILURES):
                return False  # an interrupt, a skip: not a failed check
            self.failures.append(self._message(error))
        failed = [r for r, f in enumerate(
            self.comm.allgather(bool(self.failures))) if f]
        if failed:
            raise AssertionError('failed on rank(s) {}; this rank ({}):\n{}'
                                 .format(failed, self.comm.rank,
                                         '\n'.join(self.failures)
                                         or 'passed'))
        return True


def assert_matches_reference(ours, ref, offset, n, size, rtol, atol,
                             params=True):
    """Our per-rank result against the slice of the global reference.

    Parameter gradients are compared after the data-parallel mean over the
    ``size`` processes; they equal the global gradient divided by ``size``.
    Collective: every rank raises when any rank found a mismatch.
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
    with on_every_rank(comm) as ranks:
        for what, actual, expected in checks:
            ranks.check(assert_close, actual, expected, rtol, atol, what)


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
