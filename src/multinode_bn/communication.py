"""The only module that knows communicators.

A communicator handed to :mod:`multinode_bn` is either a ChainerMN
communicator (``chainermn.create_communicator(...)``) or a plain
``mpi4py.MPI.Comm`` (``MPI.COMM_WORLD``, a ``Split`` sub-communicator, ...).
This module turns it into a *statistics exchange*: an object that allreduces
the small per-channel buffers of :mod:`multinode_bn.statistics` and nothing
else. Every collective call of the package is in this file.

Two exchanges exist, with one format: a float64 buffer summed elementwise
over processes (the moments as sums around a shift shared by every process,
see :func:`multinode_bn.statistics.moments_to_shifted_sums`, or the sums of
the backward), with the tag of :mod:`multinode_bn.validation` (what the
exchange is) in front.

* :class:`MpiStatsExchange` moves host buffers with one ``Iallreduce`` of
  MPI's built-in ``SUM`` (tag and statistics together); CuPy buffers are
  staged through host memory (they are O(channels), not O(batch)).
* :class:`NcclStatsExchange` allreduces device buffers with the NCCL
  communicator of ChainerMN's ``PureNcclCommunicator`` on the current stream,
  in buffers allocated once per link and reused. The tag is summed on the
  host by MPI first, and the caller's verdict on it decides whether NCCL is
  handed a buffer at all (processes whose inputs disagree may disagree on
  its size).

Every wait for a collective reports a stall (:func:`wait`,
:class:`StallPolicy`).
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


def _mpi():
    # Imported late: ``import multinode_bn`` must not initialize MPI.
    from mpi4py import MPI
    return MPI


def is_nccl_communicator(comm):
    """Whether ``comm`` is ChainerMN's ``PureNcclCommunicator``."""
    try:
        from chainermn.communicators.pure_nccl_communicator import \
            PureNcclCommunicator
    except ImportError:  # pragma: no cover - chainermn ships with chainer
        return False
    return isinstance(comm, PureNcclCommunicator)


def mpi_comm_of(comm):
    """The ``mpi4py`` communicator behind ``comm``.

    Raises:
        TypeError: ``comm`` is neither an ``mpi4py.MPI.Comm`` nor a ChainerMN
            communicator.
    """
    MPI = _mpi()
    if isinstance(comm, MPI.Comm):
        return comm
    inner = getattr(comm, 'mpi_comm', None)
    if isinstance(inner, MPI.Comm):
        return inner
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
    """A statistics exchange for ``comm`` over ``backend`` (``'mpi'``/``'nccl'``)."""
    if backend == 'nccl':
        return NcclStatsExchange(comm)
    return MpiStatsExchange(comm)


class StallPolicy(object):
    """How long a process waits in an exchange before it says so, and
    before it gives up.

    Args:
        timeout (float or None): Seconds before a waiting process prints one
            line naming the link, its call count and what it sent. ``None``
            or ``0`` disables the report.
        action (str): What happens at ``timeout``: ``'report'`` (print, then
            keep waiting until ``abort_after``) or ``'raise'`` (print, then
            raise :class:`StallError` at once).
        stream: Where the line goes (default ``sys.stderr``).
        abort_after (float or None): Seconds after which a process still
            waiting raises :class:`StallError` whatever ``action`` says,
            which ends the job under ``python -m mpi4py``. ``None`` or ``0``
            waits for ever. Default: :data:`DEFAULT_ABORT_AFTER`.
    """

    def __init__(self, timeout=60.0, action='report', stream=None,
                 abort_after=None):
        if action not in ACTIONS:
            raise ValueError("action must be 'report' or 'raise'; got "
                             '{!r}'.format(action))
        self.timeout = _checked_timeout(timeout)
        self.action = action
        self.stream = stream
        self.abort_after = _checked_timeout(
            DEFAULT_ABORT_AFTER if abort_after is None else abort_after,
            'abort_after')

    def __repr__(self):
        return ('StallPolicy(timeout={!r}, action={!r}, stream={!r}, '
                'abort_after={!r})'.format(self.timeout, self.action,
                                           self.stream, self.abort_after))

    @classmethod
    def from_environment(cls, environ=os.environ):
        """From ``MULTINODE_BN_STALL_TIMEOUT`` (seconds, ``0`` or ``off``
        to disable; default 60), ``MULTINODE_BN_STALL_ACTION`` (``report``
        or ``raise``) and ``MULTINODE_BN_STALL_ABORT`` (seconds, ``0`` or
        ``off`` to wait for ever; default 1800). An invalid value is named
        in a warning and replaced by the default: importing the package
        never fails because of the environment."""
        def seconds(name, default):
            raw = environ.get(name, str(default)).strip().lower()
            try:
                return _checked_timeout(
                    0 if raw in ('0', 'off', 'none', 'no') else raw)
            except ValueError:
                _bad_environment(name, raw, 'a positive number of seconds, '
                                 'or 0 or off', str(default))
                return float(default)

        timeout = seconds('MULTINODE_BN_STALL_TIMEOUT', 60)
        abort_after = seconds('MULTINODE_BN_STALL_ABORT',
                              int(DEFAULT_ABORT_AFTER))
        action = environ.get('MULTINODE_BN_STALL_ACTION',
                             'report').strip().lower()
        if action not in ACTIONS:
            _bad_environment('MULTINODE_BN_STALL_ACTION', action,
                             'report or raise', 'report')
            action = 'report'
        return cls(timeout, action, abort_after=abort_after or 0)


#: Seconds after which a stalled exchange raises by default: 30 minutes,
#: the longer default of PyTorch's NCCL watchdog (see docs/reliability.md).
DEFAULT_ABORT_AFTER = 1800.0
ACTIONS = ('report', 'raise')


def _checked_timeout(timeout, name='timeout'):
    """A stall limit as seconds, or ``None`` (``None`` or 0: none);
    ValueError for anything but a finite positive number."""
    if timeout is None:
        return None
    try:
        seconds = float(timeout)
    except (TypeError, ValueError):
        seconds = float('nan')
    if seconds == 0:
        return None
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError('{} must be a positive number of seconds, or '
                         'None or 0 to disable it; got {!r}'.format(
                             name, timeout))
    return seconds


def _bad_environment(name, value, accepted, default):
    warnings.warn('{}={!r} is not valid (accepted: {}); using {}.'.format(
        name, value, accepted, default), RuntimeWarning, stacklevel=3)


class StallError(RuntimeError):
    """An exchange did not complete in time. The collective is left in
    flight: its link refuses further calls, and the job should end (let the
    exception propagate under ``python -m mpi4py``)."""


_stall_policy = [StallPolicy.from_environment()]


def set_stall_policy(timeout=60.0, action='report', stream=None,
                     abort_after=None):
    """Sets how long exchanges wait before reporting a stall, and before
    raising :class:`StallError` (the arguments of :class:`StallPolicy`).

    Returns:
        StallPolicy: The previous policy, to restore it later.
    """
    previous = _stall_policy[0]
    _stall_policy[0] = StallPolicy(timeout, action, stream, abort_after)
    return previous


def get_stall_policy():
    """The :class:`StallPolicy` in effect."""
    return _stall_policy[0]


def wait(request, rank, describe, policy=None):
    """Completes a non-blocking collective, reporting a stall.

    Spins on ``Test`` (the exchange is usually done within microseconds),
    then yields the processor so that oversubscribed processes can run.
    """
    policy = policy or _stall_policy[0]
    start = time.monotonic()
    spins = 0
    reported = False
    while not request.Test():
        spins += 1
        if spins < 2000:
            continue
        now = time.monotonic()
        if now - start > 0.01:
            time.sleep(0.0002)
        else:
            time.sleep(0)
        waited = now - start
        abort = policy.abort_after and waited > policy.abort_after
        if policy.timeout and not reported and waited > policy.timeout \
                or abort:
            reported = True
            line = ('multinode_bn: rank {} has waited {:.0f} s in {}; the '
                    'other processes have not joined. Likely causes, in '
                    'order: a process exited or crashed (launch with '
                    '`mpiexec ... python -m mpi4py script.py` so that one '
                    'failure ends the job); processes disagree on control '
                    'flow (links called on some processes only, in another '
                    'order, or a skipped backward); links built on '
                    'different communicators.'.format(
                        rank, waited, describe()))
            if abort or policy.action == 'raise':
                line += (' Giving up (StallError) after {:.0f} s; a longer '
                         'wait is allowed by MULTINODE_BN_STALL_ABORT or '
                         'set_stall_policy(abort_after=...).'.format(
                             waited) if abort else '')
                print(line, file=policy.stream or sys.stderr, flush=True)
                raise StallError(line)
            print(line, file=policy.stream or sys.stderr, flush=True)


class _StatsExchange(object):
    """What both exchanges share: the link's own communicator, the host
    collectives, the stall and thread checks.

    Each exchange (one per link) works on its own duplicate of the
    communicator, made at its first exchange: exchanges of different links
    can never be paired with each other (processes that call links in
    different orders wait, and the stall report names the link on each
    process), and every exchange of one link has the same size
    (:attr:`width`), so no reduction ever meets buffers of different sizes.

    Args:
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm``. Kept as given;
            a copy of the owning link shares it.
    """

    def __init__(self, comm):
        self.comm = comm
        self.base_comm = mpi_comm_of(comm)
        self.size = self.base_comm.Get_size()
        self.rank = self.base_comm.Get_rank()
        #: Values of every summed exchange (set by the owner at the first
        #: call: the tag plus ``1 + 2 C``).
        self.width = None
        #: What stalled, once an exchange raised :class:`StallError`.
        self.stalled = None
        self._own = None
        # The thread of the first call: a link and its copies share this
        # exchange, and are used from that thread only. The object, not its
        # ident, which a later thread may reuse.
        self._owner = None
        self._owner_lock = threading.Lock()

    def __deepcopy__(self, memo):
        # A communicator is a process-wide resource: copies share it.
        return self

    def link_comm(self, describe):
        """This exchange's own duplicate of the communicator, made at the
        first exchange (``describe`` says which, for a stall report) by a
        non-blocking duplication under the stall report."""
        if self._own is None:
            if self.size == 1:
                self._own = self.base_comm
            else:
                self._own = self._duplicate(self.base_comm, describe)
                weakref.finalize(self, _free, self._own)
        return self._own

    def _duplicate(self, comm, describe):
        try:
            own, request = comm.Idup()
            self._wait(request, lambda: 'creation of the communicator for '
                       'the ' + describe(), own)
        except _mpi().Exception as error:
            raise RuntimeError(
                'multinode_bn: rank {}: the communicator for the {} could not '
                'be created ({}). Each synchronized link that has exchanged '
                'holds a communicator of its own, and MPI allows a few '
                'thousand at once (MPICH: about 2,000): keep fewer links '
                'alive, or share one link between copies of a model '
                '(copy.deepcopy and link.copy() share it).'.format(
                    self.rank, describe(), error.Get_error_string()))
        return own

    def admit(self, describe):
        """Raises unless the calling thread may exchange now: not after an
        exchange of this link stalled, and only from the thread that made
        the link's first call (exchanges of two threads would pair in
        whatever order they reach the collective, mixing statistics
        silently, whether they overlap in time or take turns)."""
        if self.stalled:
            raise StallError(
                'multinode_bn: rank {}: {} cannot run: an earlier exchange of '
                'this link stalled ({}) and is still in flight. End the job '
                'and launch it again.'.format(self.rank, describe(),
                                              self.stalled))
        thread = threading.current_thread()
        if self._owner is not thread:
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
                        self.rank, describe(), thread.name,
                        self._owner.name))

    def _width(self, n, buf):
        if self.width is None or n + buf.size > self.width:
            raise ValueError('exchange of {} values on a link whose exchanges '
                             'hold {}'.format(n + buf.size, self.width))
        return self.width

    def _wait(self, request, describe, *buffers):
        try:
            wait(request, self.rank, describe)
        except BaseException as error:
            # The collective is still in flight (a stall, an interrupt): its
            # request, buffers and communicator must outlive this call, or a
            # late completion would write into freed memory.
            _ABANDONED.append((request, buffers, self._own))
            self.stalled = '{} ({})'.format(describe(),
                                            type(error).__name__)
            raise

    def _host_sum(self, buf, describe):
        """Elementwise float64 sum over processes of a host array."""
        host = numpy.ascontiguousarray(buf, dtype=numpy.float64)
        out = numpy.empty_like(host)
        request = self.link_comm(describe).Iallreduce(host, out,
                                                      op=_mpi().SUM)
        self._wait(request, describe, host, out)
        return out

    def allgather_record(self, record, describe=str):
        """Every process's int64 ``record``, ``(size, len(record))``.

        Records are small host arrays of one fixed size on every process
        (:data:`multinode_bn.validation.RECORD_LEN`), also on the NCCL
        backend, so this exchange can neither truncate nor hang on a size
        mismatch.
        """
        out = numpy.empty((self.size, len(record)), dtype=numpy.int64)
        if self.size == 1:
            out[0] = record
            return out
        send = numpy.ascontiguousarray(record, dtype=numpy.int64)
        request = self.link_comm(describe).Iallgather(send, out)
        self._wait(request, describe, send, out)
        return out


class MpiStatsExchange(_StatsExchange):
    """Exchanges statistics over MPI.

    Args:
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm``. Kept as given;
            a copy of the owning link shares it.
    """

    backend = 'mpi'

    def allreduce_sums(self, buf, tag, describe=str, proceed=None):
        """Sums a float64 vector and its tag over processes, in one
        collective of :attr:`width` values (``buf`` is padded).

        Args:
            buf: float64 vector (NumPy or CuPy), at most ``width -
                len(tag)`` values.
            tag: float64 host vector (:func:`multinode_bn.validation.exchange_tag`).
            describe: Returns what this call is, for a stall report.
            proceed: Unused here (see :class:`NcclStatsExchange`).

        Returns:
            tuple: The summed buffer (like ``buf``) and the summed tag.
        """
        if self.size == 1:
            return buf, tag
        n = len(tag)
        send = numpy.zeros(self._width(n, buf))
        send[:n] = tag
        send[n:n + buf.size] = to_host(buf).ravel()
        out = self._host_sum(send, describe)
        return _like(buf, out[n:n + buf.size].reshape(buf.shape)), out[:n]


class NcclStatsExchange(_StatsExchange):
    """Exchanges statistics with NCCL on the current CUDA stream.

    Device buffers are allocated once per device, stream and size, and
    reused.

    The tag of every exchange is summed on the host with MPI, not appended
    to the NCCL buffer: reading it back from the device would wait
    for every kernel queued before it, and processes in different exchanges
    learn it before NCCL is handed their buffers. The host collective runs
    while the device still computes the local statistics.
    """

    backend = 'nccl'

    def __init__(self, comm):
        if not is_nccl_communicator(comm):
            raise ValueError('NcclStatsExchange needs a PureNcclCommunicator')
        super(NcclStatsExchange, self).__init__(comm)
        self._buffers = {}

    def _buffer(self, n):
        import cupy
        # Per stream as well: a buffer still read by kernels queued on one
        # stream must not be overwritten from another.
        key = (cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr, n)
        buf = self._buffers.get(key)
        if buf is None:
            buf = cupy.empty(n, dtype=numpy.float64)
            self._buffers[key] = buf
        return buf

    def _allreduce_device(self, arr):
        """``arr`` summed over processes, in the reused buffer of its size:
        valid until the next exchange of that size on this stream."""
        import cupy
        from cupy.cuda import nccl
        self.comm._init_comms()
        buf = self._buffer(arr.size)
        buf[...] = arr.ravel()
        stream = cupy.cuda.get_current_stream()
        self.comm.nccl_comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size,
                                      nccl.NCCL_FLOAT64, nccl.NCCL_SUM,
                                      stream.ptr)
        return buf.reshape(arr.shape)

    def allreduce_sums(self, buf, tag, describe=str, proceed=None):
        """See :meth:`MpiStatsExchange.allreduce_sums`: two collectives,
        the tag on the host first, then ``buf`` padded to the link's width
        on the device, only if ``proceed(summed_tag)`` (every process reads
        the same sums, so all of them skip the device collective alike; the
        result is a new array)."""
        if self.size == 1:
            return buf, tag
        summed_tag = self._host_sum(tag, describe)
        if proceed is not None and not proceed(summed_tag):
            return buf, summed_tag
        import cupy
        n = len(tag)
        padded = cupy.zeros(self._width(n, buf) - n, dtype=numpy.float64)
        padded[:buf.size] = cupy.asarray(buf, dtype=numpy.float64).ravel()
        summed = self._allreduce_device(padded)
        return summed[:buf.size].reshape(buf.shape).copy(), summed_tag


def to_host(a):
    """``a`` as a NumPy array. A CuPy array is copied on the current stream
    once the kernels queued on it have run: a plain ``get()`` would copy on
    the default stream, which does not wait for a non-blocking stream's
    kernels."""
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


# Collectives whose exchange raised StallError, kept alive for good.
_ABANDONED = []
def allgather_objects(comm, obj):
    """Every process's ``obj`` (picklable), in rank order: mpi4py's
    pickle-based ``allgather``, for the few exchanges of the population
    statistics that are not sums of a fixed size.

    Args:
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm``.
        obj: What this process contributes.
    """
    mpi_comm = mpi_comm_of(comm)
    if mpi_comm.Get_size() == 1:
        return [obj]
    return mpi_comm.allgather(obj)


def _free(comm):
    MPI = _mpi()
    if MPI.Is_finalized() or any(c is comm for _, _, c in _ABANDONED):
        return
    comm.Free()
