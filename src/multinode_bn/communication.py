"""Communicators and every collective of the package: a link's statistics
exchange (:func:`create_exchange`), which moves buffers and knows nothing
of what they mean, and the wait that reports stalls (:func:`wait`,
:class:`StallPolicy`). See docs/design.md and docs/reliability.md.
"""

import math
import os
import sys
import threading
import time
import warnings
import weakref

import numpy

BACKENDS = ('mpi', 'nccl', 'auto')
ACTIONS = ('report', 'raise')
#: Seconds after which a stalled exchange raises by default: 30 minutes,
#: the longer default of PyTorch's NCCL watchdog (see docs/reliability.md).
DEFAULT_ABORT_AFTER = 1800.0


def _mpi():
    # Imported late: ``import multinode_bn`` must not initialize MPI.
    from mpi4py import MPI
    return MPI


def is_nccl_communicator(comm):
    """Whether ``comm`` is ChainerMN's ``PureNcclCommunicator``."""
    from chainermn.communicators.pure_nccl_communicator import \
        PureNcclCommunicator
    return isinstance(comm, PureNcclCommunicator)


def mpi_comm_of(comm):
    """The ``mpi4py`` communicator behind ``comm``; TypeError if none."""
    MPI = _mpi()
    for candidate in (comm, getattr(comm, 'mpi_comm', None)):
        if isinstance(candidate, MPI.Comm):
            return candidate
    raise TypeError(
        'comm must be a ChainerMN communicator (chainermn.create_communicator)'
        ' or an mpi4py.MPI.Comm such as MPI.COMM_WORLD; got {!r}'.format(
            type(comm)))


def select_backend(comm, communication_backend='auto'):
    """``'mpi'`` or ``'nccl'``: ``'auto'`` picks NCCL for ChainerMN's
    ``PureNcclCommunicator``; ValueError for an unknown name, or for
    ``'nccl'`` with a communicator that has no NCCL."""
    if communication_backend not in BACKENDS:
        raise ValueError(
            'communication_backend must be one of {}; got {!r}'.format(
                ', '.join(repr(b) for b in BACKENDS), communication_backend))
    nccl = is_nccl_communicator(comm)
    if communication_backend == 'nccl' and not nccl:
        raise ValueError(
            "communication_backend='nccl' needs ChainerMN's "
            "PureNcclCommunicator (chainermn.create_communicator('pure_nccl'))"
            "; got {}. Use 'mpi' or 'auto'.".format(type(comm).__name__))
    if communication_backend == 'auto':
        return 'nccl' if nccl else 'mpi'
    return communication_backend


def create_exchange(comm, backend):
    """A statistics exchange for ``comm`` over ``'mpi'`` or ``'nccl'``."""
    if backend == 'nccl':
        return NcclStatsExchange(comm)
    return MpiStatsExchange(comm)


class StallError(RuntimeError):
    """An exchange did not complete in time. Its link refuses further
    calls: let the exception end the job (``python -m mpi4py``)."""


class StallPolicy(object):
    """When a process waiting in an exchange says so, and gives up.

    Args:
        timeout (float or None): Seconds before a waiting process prints
            one line naming the exchange; ``None`` or ``0``: never.
        action (str): At ``timeout``, ``'report'`` (print, keep waiting)
            or ``'raise'`` (print, raise :class:`StallError`).
        stream: Where the line goes (default ``sys.stderr``).
        abort_after (float or None): Seconds before :class:`StallError`
            whatever ``action`` says (``0``: wait for ever; default
            :data:`DEFAULT_ABORT_AFTER`).
    """

    def __init__(self, timeout=60.0, action='report', stream=None,
                 abort_after=None):
        if abort_after is None:
            abort_after = DEFAULT_ABORT_AFTER
        self.action = _checked('action', action)
        self.timeout = _checked('timeout', timeout)
        self.stream = stream
        self.abort_after = _checked('abort_after', abort_after)

    def __repr__(self):
        return ('StallPolicy(timeout={!r}, action={!r}, stream={!r}, '
                'abort_after={!r})'.format(self.timeout, self.action,
                                           self.stream, self.abort_after))

    @classmethod
    def from_environment(cls, environ=os.environ):
        """From ``MULTINODE_BN_STALL_TIMEOUT``, ``_ABORT`` (seconds; ``0``
        or ``off``: none) and ``_ACTION``. An invalid value is named in a
        warning and replaced by the default: the import never fails."""
        settings = {}
        for field, name, default in (
                ('timeout', 'MULTINODE_BN_STALL_TIMEOUT', '60'),
                ('abort_after', 'MULTINODE_BN_STALL_ABORT',
                 str(int(DEFAULT_ABORT_AFTER))),
                ('action', 'MULTINODE_BN_STALL_ACTION', 'report')):
            raw = environ.get(name, default).strip().lower()
            value = 0 if raw in ('0', 'off', 'none', 'no') else raw
            try:
                _checked(field, value)
            except ValueError:
                accepted = ('report or raise' if field == 'action' else
                            'a positive number of seconds, or 0 or off')
                warnings.warn('{}={!r} is not valid (accepted: {}); using {}.'
                              .format(name, raw, accepted, default),
                              RuntimeWarning, stacklevel=2)
                value = default
            settings[field] = value
        return cls(**settings)


def _checked(field, value):
    """``value`` as ``field`` of a :class:`StallPolicy`: an action, or
    seconds (``None`` for ``None`` or 0); ValueError for anything else."""
    if field == 'action':
        if value in ACTIONS:
            return value
        raise ValueError("action must be 'report' or 'raise'; got "
                         '{!r}'.format(value))
    try:
        seconds = 0.0 if value is None else float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if 0 <= seconds < math.inf:
        return seconds or None
    raise ValueError('{} must be a positive number of seconds, or None or '
                     '0 to disable it; got {!r}'.format(field, value))


_stall_policy = StallPolicy.from_environment()


def set_stall_policy(timeout=60.0, action='report', stream=None,
                     abort_after=None):
    """Sets the :class:`StallPolicy` (its arguments); returns the previous
    one, to restore it later."""
    global _stall_policy
    previous = _stall_policy
    _stall_policy = StallPolicy(timeout, action, stream, abort_after)
    return previous


def get_stall_policy():
    """The :class:`StallPolicy` in effect."""
    return _stall_policy


def wait(request, rank, describe, policy=None):
    """Completes a non-blocking collective, reporting a stall: spins on
    ``Test`` (usually done in microseconds), then yields the processor to
    oversubscribed processes."""
    policy = policy or _stall_policy
    start = time.monotonic()
    spins = 0
    reported = False
    while not request.Test():
        spins += 1
        if spins < 2000:
            continue
        waited = time.monotonic() - start
        time.sleep(0.0002 if waited > 0.01 else 0)
        abort = policy.abort_after and waited > policy.abort_after
        late = policy.timeout and waited > policy.timeout and not reported
        if not (late or abort):
            continue
        reported = True
        line = ('multinode_bn: rank {} has waited {:.0f} s in {}; the '
                'other processes have not joined. Likely causes, in '
                'order: a process exited or crashed (launch with '
                '`mpiexec ... python -m mpi4py script.py` so that one '
                'failure ends the job); processes disagree on control '
                'flow (links called on some processes only, in another '
                'order, or a skipped backward); links built on '
                'different communicators.'.format(rank, waited, describe()))
        if abort:
            line += (' Giving up (StallError) after {:.0f} s; a longer '
                     'wait is allowed by MULTINODE_BN_STALL_ABORT or '
                     'set_stall_policy(abort_after=...).'.format(waited))
        print(line, file=policy.stream or sys.stderr, flush=True)
        if abort or policy.action == 'raise':
            raise StallError(line)


class MpiStatsExchange(object):
    """A link's exchanges over MPI, on a duplicate of the communicator of
    their own and all of one size (:attr:`width`): those of different links
    never pair, and no reduction meets buffers of different sizes. CuPy
    buffers are staged through host memory (they are O(channels)).

    Args:
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm``. Kept as given;
            a copy of the owning link shares it.
    """

    def __init__(self, comm):
        self.comm = comm
        self.base_comm = mpi_comm_of(comm)
        self.size = self.base_comm.Get_size()
        self.rank = self.base_comm.Get_rank()
        #: Values in every summed exchange, the tag's included (set by the
        #: owner at the first call).
        self.width = None
        #: What stalled, once an exchange raised :class:`StallError`.
        self.stalled = None
        self._own = None
        self._owner = None  # a thread, not its ident, which may be reused
        self._owner_lock = threading.Lock()

    def __deepcopy__(self, memo):
        return self  # a communicator is a process-wide resource

    def link_comm(self, describe):
        """This exchange's own duplicate of the communicator, made at the
        first exchange (``describe()``, for a stall report) by ``Idup``."""
        if self._own is None and self.size == 1:
            self._own = self.base_comm
        elif self._own is None:
            try:
                own, request = self.base_comm.Idup()
                self._wait(request, lambda: 'creation of the communicator '
                           'for the ' + describe(), own)
            except _mpi().Exception as error:
                raise RuntimeError(
                    'multinode_bn: rank {}: the communicator for the {} '
                    'could not be created ({}). Each synchronized link that '
                    'has exchanged holds a communicator of its own, and MPI '
                    'allows a few thousand at once (MPICH: about 2,000): '
                    'keep fewer links alive, or share one link between '
                    'copies of a model (copy.deepcopy and link.copy() share '
                    'it).'.format(self.rank, describe(),
                                  error.Get_error_string()))
            self._own = own
            weakref.finalize(self, _free, own)
        return self._own

    def admit(self, describe):
        """Raises unless the calling thread may exchange now: not after an
        exchange stalled, and only from the thread of the first call (two
        threads' exchanges would pair in whatever order they come)."""
        if self.stalled:
            raise StallError(
                'multinode_bn: rank {}: {} cannot run: an earlier exchange of '
                'this link stalled ({}) and is still in flight. End the job '
                'and launch it again.'.format(self.rank, describe(),
                                              self.stalled))
        thread = threading.current_thread()
        with self._owner_lock:
            if self._owner is None:
                self._owner = thread
        if self._owner is not thread:
            raise RuntimeError(
                'multinode_bn: rank {}: {} was called from thread {!r}, '
                'but the link made its first call from thread {!r}. A '
                'synchronized link (and its copies, which share its '
                'communicator) is used from one thread: the exchanges '
                'of two threads would pair across processes in whatever '
                'order they come. Give each thread a link of its own, '
                'on a communicator of its own.'.format(
                    self.rank, describe(), thread.name, self._owner.name))

    def allreduce_sums(self, buf, tag, describe=str, proceed=None):
        """The sums over processes of ``buf`` (like it) and of ``tag``, in
        one collective of :attr:`width` values.

        Args:
            buf: float64 NumPy or CuPy array of ``width - len(tag)`` values
                at most.
            tag: float64 host vector (:func:`validation.exchange_tag`).
            describe: Returns what this call is, for a stall report.
            proceed: For :class:`NcclStatsExchange` only.
        """
        if self.size == 1:
            return buf, tag
        n = len(tag)
        send = numpy.zeros(self._width(n, buf))
        send[:n] = tag
        send[n:n + buf.size] = to_host(buf).ravel()
        out = self._host_sum(send, describe)
        return _like(buf, out[n:n + buf.size].reshape(buf.shape)), out[:n]

    def allgather_record(self, record, describe=str):
        """Every process's int64 ``record``, ``(size, len(record))``; of
        one size everywhere, so it can neither truncate nor hang."""
        out = numpy.empty((self.size, len(record)), dtype=numpy.int64)
        if self.size == 1:
            out[0] = record
            return out
        send = numpy.ascontiguousarray(record, dtype=numpy.int64)
        request = self.link_comm(describe).Iallgather(send, out)
        self._wait(request, describe, send, out)
        return out

    def _width(self, n, buf):
        if self.width is None or n + buf.size > self.width:
            raise ValueError('exchange of {} values on a link whose exchanges '
                             'hold {}'.format(n + buf.size, self.width))
        return self.width

    def _host_sum(self, buf, describe):
        host = numpy.ascontiguousarray(buf, dtype=numpy.float64)
        out = numpy.empty_like(host)
        request = self.link_comm(describe).Iallreduce(host, out,
                                                      op=_mpi().SUM)
        self._wait(request, describe, host, out)
        return out

    def _wait(self, request, describe, *buffers):
        try:
            wait(request, self.rank, describe)
        except BaseException as error:
            # Still in flight (a stall, an interrupt): what it may write to
            # is kept for good, or a late completion would hit freed memory.
            _ABANDONED.append((request, buffers, self._own))
            self.stalled = '{} ({})'.format(describe(), type(error).__name__)
            raise


class NcclStatsExchange(MpiStatsExchange):
    """Sums statistics with NCCL on the current CUDA stream, in buffers
    allocated once per device, stream and size. Tags and records go over
    MPI on the host: processes learn there, without waiting for the
    device, whether their exchanges agree before NCCL is handed buffers.

    Args:
        comm: ChainerMN's ``PureNcclCommunicator``.
    """

    def __init__(self, comm):
        if not is_nccl_communicator(comm):
            raise ValueError('NcclStatsExchange needs a PureNcclCommunicator')
        super(NcclStatsExchange, self).__init__(comm)
        self._buffers = {}

    def allreduce_sums(self, buf, tag, describe=str, proceed=None):
        """As :meth:`MpiStatsExchange.allreduce_sums`, the device collective
        only if ``proceed(summed_tag)``: every process reads the same sums,
        so all skip it alike. The result is a new array."""
        if self.size == 1:
            return buf, tag
        summed_tag = self._host_sum(tag, describe)
        if proceed is not None and not proceed(summed_tag):
            return buf, summed_tag
        import cupy
        from cupy.cuda import nccl
        n = self._width(len(tag), buf) - len(tag)
        stream = cupy.cuda.get_current_stream()
        # Per stream too: another stream's kernels may still read a buffer.
        key = (cupy.cuda.Device().id, stream.ptr, n)
        if key not in self._buffers:
            self._buffers[key] = cupy.empty(n, dtype=numpy.float64)
        summed = self._buffers[key]
        summed[:buf.size] = cupy.asarray(buf, dtype=numpy.float64).ravel()
        summed[buf.size:] = 0
        self.comm._init_comms()
        self.comm.nccl_comm.allReduce(summed.data.ptr, summed.data.ptr, n,
                                      nccl.NCCL_FLOAT64, nccl.NCCL_SUM,
                                      stream.ptr)
        return summed[:buf.size].reshape(buf.shape).copy(), summed_tag


def to_host(a):
    """``a`` as a NumPy array, copied on the current stream once its
    kernels have run (``get()`` would not wait for a non-blocking one)."""
    if type(a) is numpy.ndarray:
        return numpy.ascontiguousarray(a)
    import cupy
    stream = cupy.cuda.get_current_stream()
    host = a.get(stream=stream)
    stream.synchronize()
    return host


def _like(reference, host):
    """``host`` on the device of ``reference`` (a NumPy or CuPy array),
    copied on the current stream, before the kernels queued after it."""
    if type(reference) is numpy.ndarray:
        return host
    import cupy
    out = cupy.empty(host.shape, dtype=host.dtype)
    out.set(host, stream=cupy.cuda.get_current_stream())
    return out


def allgather_objects(comm, obj):
    """Every process's picklable ``obj``, in rank order, for exchanges
    that are not sums of a fixed size (``comm`` as for the links)."""
    mpi_comm = mpi_comm_of(comm)
    if mpi_comm.Get_size() == 1:
        return [obj]
    return mpi_comm.allgather(obj)


# Collectives left in flight by a stall or an interrupt, kept for good.
_ABANDONED = []


def _free(comm):
    if _mpi().Is_finalized() or any(c is comm for _, _, c in _ABANDONED):
        return
    comm.Free()
