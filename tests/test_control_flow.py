"""Mispaired exchanges: processes that disagree on control flow (a skipped
backward, links in another order, a skipped or extra call, another
configuration, two threads) raise on every process or report a stall that
names the link; nothing is silently mixed."""

import copy
import io
import os
import subprocess
import sys
import threading
import time

import numpy
import pytest

import chainer
import chainer.functions as F
from mpi4py import MPI

import multinode_bn
from multinode_bn import communication
from multinode_bn.validation import InconsistentInputError
from conftest import assert_matches_reference, reference, run_link

parallel = pytest.mark.parallel(nprocs=[2, 3])


class stall_raises(object):
    """Stalls raise ``StallError`` after ``timeout`` seconds (and say so in
    ``self.stream``) inside the block."""

    def __init__(self, timeout=1.0):
        self.timeout = timeout
        self.stream = io.StringIO()

    def __enter__(self):
        self.previous = communication.set_stall_policy(
            self.timeout, 'raise', self.stream)
        return self

    def __exit__(self, *exc):
        p = self.previous
        communication.set_stall_policy(p.timeout, p.action, p.stream,
                                       p.abort_after)


def _outcome(step):
    """``step()``'s outcome on this process, and every process's."""
    try:
        step()
        mine = 'ok'
    except InconsistentInputError as e:
        mine = 'InconsistentInputError: ' + str(e)
    except communication.StallError as e:
        mine = 'StallError: ' + str(e)
    return mine, MPI.COMM_WORLD.allgather(mine.split(':')[0])


def _x(rank, shape=(4, 3), seed=0):
    return numpy.random.RandomState(seed + rank).standard_normal(
        shape).astype(numpy.float32)


def _train(link, x):
    y = link(x)
    link.cleargrads()
    y.grad = numpy.ones_like(x)
    return y


@parallel
def test_skipped_backward_on_one_process_raises_on_every_process():
    # A process skips its update (say, after a NaN loss): its next forward
    # meets the others' backward of the same link. Before, they were summed
    # (gamma.grad of 9e6 on one process, an error blaming the wrong process
    # on the other).
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    link.label = '/net/bn'
    x = _x(comm.rank)
    _train(link, x).backward()
    y = _train(link, x)

    def step():
        if comm.rank == 1:
            link(x)  # next iteration's forward, backward skipped
        else:
            y.backward()
    mine, everyone = _outcome(step)
    assert set(everyone) == {'InconsistentInputError'}, everyone
    assert 'backward exchange' in mine and 'forward exchange' in mine, mine
    assert '/net/bn call 2' in mine and '/net/bn call 3' in mine, mine
    if comm.rank != 1:
        assert link.gamma.grad is None or not numpy.any(
            numpy.abs(link.gamma.grad) > 1e3)


@parallel
def test_same_shape_links_in_swapped_order_stall_and_name_the_link():
    comm = MPI.COMM_WORLD
    a = multinode_bn.MultiNodeBatchNormalization(3, comm)
    b = multinode_bn.MultiNodeBatchNormalization(3, comm)
    a.label, b.label = '/a', '/b'
    x = _x(comm.rank)
    a(x), b(x)  # in order: both links have their communicator
    first, second = (b, a) if comm.rank == 1 else (a, b)
    with stall_raises() as policy:
        mine, everyone = _outcome(lambda: (first(x), second(x)))
    # Each process waits in its own link's exchange: nothing is mixed.
    assert set(everyone) == {'StallError'}, everyone
    name = first.label
    assert 'forward exchange of {} (call 2'.format(name) in mine, mine
    assert 'disagree on control flow' in policy.stream.getvalue()
    # The link refuses further calls instead of pairing again.
    with pytest.raises(communication.StallError, match='stalled'):
        first(x)


@parallel
def test_links_swapped_on_their_first_call_raise_on_every_process():
    # Before any exchange the links have no communicator of their own: the
    # first-call check names each process's link.
    comm = MPI.COMM_WORLD
    a = multinode_bn.MultiNodeBatchNormalization(3, comm)
    b = multinode_bn.MultiNodeBatchNormalization(3, comm)
    a.label, b.label = '/a', '/b'
    x = _x(comm.rank)
    first = b if comm.rank == 1 else a
    mine, everyone = _outcome(lambda: first(x))
    assert set(everyone) == {'InconsistentInputError'}, everyone
    assert '/a call 1' in mine and '/b call 1' in mine, mine
    assert 'different exchanges' in mine


@parallel
def test_links_whose_old_digests_collided_are_told_apart():
    # 284 and 833 channels collided in the old 12-bit digests: called in
    # swapped order, buffers of different sizes met in one reduction.
    comm = MPI.COMM_WORLD
    a = multinode_bn.MultiNodeBatchNormalization(284, comm)
    b = multinode_bn.MultiNodeBatchNormalization(833, comm)
    xa, xb = _x(comm.rank, (2, 284)), _x(comm.rank, (2, 833))
    a(xa), b(xb)
    calls = [(b, xb), (a, xa)] if comm.rank == 0 else [(a, xa), (b, xb)]
    with stall_raises():
        mine, everyone = _outcome(
            lambda: [link(x) for link, x in calls])
    assert set(everyone) == {'StallError'}, everyone


@parallel
def test_skipped_call_stalls_instead_of_pairing_with_another_link():
    comm = MPI.COMM_WORLD
    a = multinode_bn.MultiNodeBatchNormalization(3, comm)
    b = multinode_bn.MultiNodeBatchNormalization(3, comm)
    x = _x(comm.rank)
    a(x), b(x)
    with stall_raises():
        mine, everyone = _outcome(
            lambda: (a(x) if comm.rank != 0 else None, b(x)))
    assert set(everyone) == {'StallError'}, everyone


@parallel
def test_extra_call_of_one_link_raises_or_stalls_on_every_process():
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    other = multinode_bn.MultiNodeBatchNormalization(3, comm)
    x = _x(comm.rank)
    link(x), other(x)
    with stall_raises():
        mine, everyone = _outcome(lambda: [
            link(x) for _ in range(2 if comm.rank == 1 else 1)] + [other(x)])
    assert set(everyone) == {'StallError'}, everyone


@parallel
@pytest.mark.parametrize('setting', ['eps', 'decay', 'use_gamma',
                                     'finetune'])
def test_configuration_differing_between_processes_raises_everywhere(
        setting):
    comm = MPI.COMM_WORLD
    odd = comm.rank == 1
    kwargs = {'eps': {'eps': 1e-3 if odd else 2e-5},
              'decay': {'decay': 0.5 if odd else 0.9},
              'use_gamma': {'use_gamma': not odd}}.get(setting, {})
    link = multinode_bn.MultiNodeBatchNormalization(3, comm, **kwargs)
    x = _x(comm.rank)
    call = {'finetune': lambda: link(x, finetune=odd)}.get(
        setting, lambda: link(x))
    before = (link.avg_mean.copy(), link.avg_var.copy(), link.N)
    for _ in range(2):  # on the first call and on a later one
        mine, everyone = _outcome(call)
        assert set(everyone) == {'InconsistentInputError'}, everyone
        assert 'different exchanges' in mine, mine
        numpy.testing.assert_array_equal(link.avg_mean, before[0])
        numpy.testing.assert_array_equal(link.avg_var, before[1])
        assert link.N == before[2]


@parallel
def test_failed_lazy_first_call_is_rolled_back_on_every_process():
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(None, comm, axis=0)
    bad = numpy.zeros((2, 5), numpy.int32 if comm.rank == 1
                      else numpy.float32)
    with pytest.raises(InconsistentInputError, match='rank\\(s\\) 1'):
        link(bad)
    assert link.avg_mean is None and link.gamma.array is None
    xs = [_x(r, (3, 4)) for r in range(comm.size)]
    gys = [numpy.ones_like(x) for x in xs]
    ours = run_link(link, xs[comm.rank], gys[comm.rank])
    ref = reference(xs, gys, 4)
    assert_matches_reference(ours, ref, 3 * comm.rank, 3, comm.size, 2e-4,
                             2e-4)


@parallel
def test_functional_running_var_of_wrong_shape_raises_everywhere_first():
    comm = MPI.COMM_WORLD
    selector = multinode_bn.functions.MultiNodeBNImplSelector(comm, 'auto')
    x = _x(comm.rank)
    gamma, beta = numpy.ones(3, numpy.float32), numpy.zeros(3, numpy.float32)
    mean = numpy.zeros(3, numpy.float32)
    var = numpy.ones(4 if comm.rank == 1 else 3, numpy.float32)
    for round in range(2):  # the first call's check, then the in-band one
        with pytest.raises(InconsistentInputError,
                           match='running_mean or running_var'):
            multinode_bn.multi_node_batch_normalization(
                x, gamma, beta, selector, running_mean=mean,
                running_var=var)
        numpy.testing.assert_array_equal(mean, 0)
        numpy.testing.assert_array_equal(var, 1)
        if round == 0:
            # One good call, so that the next is checked in-band.
            multinode_bn.multi_node_batch_normalization(
                x, gamma, beta, selector, running_mean=mean.copy(),
                running_var=numpy.ones(3, numpy.float32))


def _in_thread(call):
    """``call()``'s exception in a thread of its own (``None`` if none)."""
    caught = []

    def run():
        try:
            call()
        except Exception as e:
            caught.append(e)
    thread = threading.Thread(target=run, name='second')
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), 'the second thread hangs'
    return caught[0] if caught else None


@parallel
def test_threads_taking_turns_on_one_link_raise_before_any_exchange():
    # Threads that never overlap still pair their exchanges in whatever
    # order they come: any call from a thread other than the one of the
    # link's first call raises at once, on that process, with no exchange.
    comm = MPI.COMM_WORLD
    for attempt in range(20):
        link = multinode_bn.MultiNodeBatchNormalization(3, comm)
        x = _x(comm.rank, seed=attempt)
        xs = [_x(r, seed=attempt) for r in range(comm.size)]
        gys = [numpy.ones_like(v) for v in xs]
        run_link(link, x, gys[comm.rank])  # the owning thread
        calls = link._impl_selector.protocol.calls
        error = _in_thread(lambda: link(x))
        assert isinstance(error, RuntimeError), error
        assert "thread 'second'" in str(error), error
        assert 'MainThread' in str(error), error
        assert link._impl_selector.protocol.calls == calls  # nothing counted
        # A copy shares the communicator, and so the thread.
        assert isinstance(_in_thread(lambda: copy.deepcopy(link)(x)),
                          RuntimeError)
        # The owner goes on, exact and in step with the other processes.
        ours = run_link(link, x, gys[comm.rank])
        ref = reference(xs, gys, 3, steps=2)
        assert_matches_reference(ours, ref, 4 * comm.rank, 4, comm.size,
                                 2e-4, 2e-4)


def test_environment_variables_are_validated_and_never_break_the_import():
    root = os.path.normpath(os.path.join(os.path.dirname(__file__), '..'))
    for name, value, accepted in [
            ('MULTINODE_BN_STALL_TIMEOUT', 'abc', 'positive number'),
            ('MULTINODE_BN_STALL_TIMEOUT', '-1', 'positive number'),
            ('MULTINODE_BN_STALL_TIMEOUT', 'nan', 'positive number'),
            ('MULTINODE_BN_STALL_ACTION', 'explode', 'report or raise')]:
        env = dict(os.environ, **{name: value})
        env.pop('_PYTEST_MPI_CHILD_PROCESS', None)
        proc = subprocess.run(
            [sys.executable, '-c', 'import multinode_bn; print('
             'multinode_bn.get_stall_policy())'],
            capture_output=True, text=True, timeout=120, env=env, cwd=root)
        assert proc.returncode == 0, proc.stderr
        assert name in proc.stderr and accepted in proc.stderr, proc.stderr
        assert "StallPolicy(timeout=60.0, action='report'" in proc.stdout


def test_invalid_cpu_kernels_setting_is_named(monkeypatch):
    from multinode_bn import cpu_kernels
    monkeypatch.setenv('MULTINODE_BN_CPU_KERNELS', 'maybe')
    with pytest.warns(RuntimeWarning, match='MULTINODE_BN_CPU_KERNELS'):
        cpu_kernels.choose_statistics(numpy.zeros(1, numpy.float32),
                                      numpy.float32)


def test_stall_policy_rejects_unusable_timeouts():
    for timeout in (-1, float('nan'), float('inf')):
        with pytest.raises(ValueError, match='timeout'):
            communication.StallPolicy(timeout)
    assert repr(communication.StallPolicy(2.5, 'raise')).startswith(
        "StallPolicy(timeout=2.5, action='raise'")


@parallel
def test_links_on_one_process_only_do_not_shift_the_others_labels():
    # A helper link, or a functional call, on a one-process communicator
    # made on rank 0 alone must not change how the shared links are named.
    comm = MPI.COMM_WORLD
    x = _x(comm.rank)
    if comm.rank == 0:
        multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_SELF)(x)
        multinode_bn.multi_node_batch_normalization(
            x, numpy.ones(3, numpy.float32), numpy.zeros(3, numpy.float32),
            MPI.COMM_SELF)
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    xs = [_x(r) for r in range(comm.size)]
    ours = run_link(link, x, numpy.ones_like(x))
    ref = reference(xs, [numpy.ones_like(v) for v in xs], 3)
    assert_matches_reference(ours, ref, 4 * comm.rank, 4, comm.size, 2e-4,
                             2e-4)


@parallel
def test_a_dropped_link_releases_its_communicator_at_once():
    import weakref
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    link(_x(comm.rank))
    exchange = weakref.ref(link._impl_selector.protocol.exchange)
    assert exchange().link_comm(str) is not comm
    del link
    # No reference cycle keeps it until a garbage collection.
    assert exchange() is None


@parallel
def test_links_never_called_do_not_change_the_identity_of_others():
    # A model built on rank 0 alone (a preview, an export), never called:
    # links are numbered in the order of their first synchronized call.
    comm = MPI.COMM_WORLD
    if comm.rank == 0:
        spare = [multinode_bn.MultiNodeBatchNormalization(3, comm)
                 for _ in range(2)]
        assert spare[0].label == 'MultiNodeBatchNormalization'
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    xs = [_x(r) for r in range(comm.size)]
    gys = [numpy.ones_like(v) for v in xs]
    ours = run_link(link, xs[comm.rank], gys[comm.rank])
    assert_matches_reference(ours, reference(xs, gys, 3), 4 * comm.rank, 4,
                             comm.size, 2e-4, 2e-4)
    first = comm.allgather(link.label)
    assert len(set(first)) == 1, first


@parallel
def test_named_links_swapped_on_their_first_call_raise_on_every_process():
    # Default labels carry the link's name in its parent, so two children
    # of one chain called in another order are told apart on the first
    # call, though both are the first synchronized call on each process.
    comm = MPI.COMM_WORLD
    net = chainer.Chain()
    with net.init_scope():
        net.bn_a = multinode_bn.MultiNodeBatchNormalization(3, comm)
        net.bn_b = multinode_bn.MultiNodeBatchNormalization(3, comm)
    first = net.bn_b if comm.rank == 1 else net.bn_a
    mine, everyone = _outcome(lambda: first(_x(comm.rank)))
    assert set(everyone) == {'InconsistentInputError'}, everyone
    assert "'bn_a' #" in mine and "'bn_b' #" in mine, mine
    assert 'call 1 input check' in mine, mine
