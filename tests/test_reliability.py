"""Hostile input: clear errors on every rank, no hangs, state kept."""

import io
import os
import subprocess
import sys
import textwrap
import time

import numpy
import pytest

import chainer
from mpi4py import MPI

import multinode_bn
from multinode_bn import communication, validation
from multinode_bn.validation import InconsistentInputError
from conftest import CountingComm, make_batches, reference, run_link

parallel = pytest.mark.parallel(nprocs=[2, 3])


def _raises_everywhere(make_link, make_x, match, within=10.0):
    """Every rank raises InconsistentInputError quickly, naming ``match``."""
    comm = MPI.COMM_WORLD
    link = make_link(comm.rank)
    x = make_x(comm.rank)
    start = time.monotonic()
    with pytest.raises(InconsistentInputError) as info:
        link(x)
    assert time.monotonic() - start < within
    message = str(info.value)
    for r in range(comm.size):
        assert 'rank {}:'.format(r) in message
    assert match in message, message
    return link, message


@parallel
def test_channel_count_disagreement_raises_on_every_rank():
    _, message = _raises_everywhere(
        lambda r: multinode_bn.MultiNodeBatchNormalization(
            5 if r == 1 else 4, MPI.COMM_WORLD),
        lambda r: numpy.zeros((2, 5 if r == 1 else 4, 3, 3), numpy.float32),
        'disagree')
    assert '(2, 5, 3, 3)' in message and '(2, 4, 3, 3)' in message


@parallel
def test_dtype_disagreement_raises_on_every_rank():
    _raises_everywhere(
        lambda r: multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_WORLD),
        lambda r: numpy.zeros((2, 3), numpy.float64 if r == 0
                              else numpy.float32),
        'float64')


@parallel
def test_ndim_disagreement_raises_on_every_rank():
    _raises_everywhere(
        lambda r: multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_WORLD),
        lambda r: numpy.zeros((2, 3) if r == 0 else (2, 3, 4), numpy.float32),
        'disagree')


@parallel
def test_axis_disagreement_raises_on_every_rank():
    _raises_everywhere(
        lambda r: multinode_bn.MultiNodeBatchNormalization(
            None, MPI.COMM_WORLD, axis=(0, 2, 3) if r == 0 else (0, 1, 2)),
        lambda r: numpy.zeros((2, 4, 4, 4), numpy.float32),
        'axis')


@parallel
def test_integer_input_on_one_rank_raises_on_every_rank():
    _, message = _raises_everywhere(
        lambda r: multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_WORLD),
        lambda r: numpy.zeros((2, 3), numpy.int32 if r == 1
                              else numpy.float32),
        'not floating point')
    assert 'rank(s) 1' in message


@parallel
def test_input_without_batch_axis_on_one_rank_raises_on_every_rank():
    _, message = _raises_everywhere(
        lambda r: multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_WORLD),
        lambda r: numpy.zeros((3,) if r == 1 else (2, 3), numpy.float32),
        'no batch axis')
    assert 'rank(s) 1' in message and 'x float32 (3,)' in message
    assert 'channels do not match' not in message


@parallel
def test_wrong_channel_count_for_size_raises_clearly_on_every_rank():
    _, message = _raises_everywhere(
        lambda r: multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_WORLD),
        lambda r: numpy.zeros((2, 4, 5, 5), numpy.float32),
        'channels do not match')
    assert 'params (3,)' in message


@parallel
def test_failed_call_leaves_running_statistics_and_count_unchanged():
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    good = numpy.random.RandomState(comm.rank).randn(4, 3).astype(
        numpy.float32)
    link(good, finetune=True)
    before = (link.avg_mean.copy(), link.avg_var.copy(), link.N)
    bad = numpy.zeros((2, 3), numpy.float64 if comm.rank == 0
                      else numpy.float32)
    for finetune in (True, False):
        with pytest.raises(InconsistentInputError):
            link(bad, finetune=finetune)
        numpy.testing.assert_array_equal(link.avg_mean, before[0])
        numpy.testing.assert_array_equal(link.avg_var, before[1])
        assert link.N == before[2]
    link(good, finetune=True)  # and the link still works afterwards
    assert link.N == before[2] + 1


@parallel
def test_debug_mode_nonfinite_statistics_raise_on_every_rank_naming_source():
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    link.label = '/net/bn1'
    x = numpy.ones((2, 3), numpy.float32)
    if comm.rank == 1:
        x[0, 1] = numpy.nan
    with chainer.using_config('debug', True):
        with pytest.raises(FloatingPointError) as info:
            link(x)
    assert 'rank(s) 1' in str(info.value)
    assert '/net/bn1' in str(info.value)


@parallel
def test_debug_mode_checks_finiteness_in_band_at_no_extra_collective():
    comm = CountingComm()
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    x = numpy.random.RandomState(0).randn(2, 3).astype(numpy.float32)
    link(x)
    del comm.calls[:]
    link(x)
    assert comm.calls == ['Iallreduce']
    del comm.calls[:]
    with chainer.using_config('debug', True):
        y = link(x)
        link.cleargrads()
        y.grad = numpy.ones_like(x)
        y.backward()
    assert comm.calls == ['Iallreduce', 'Iallreduce']


@pytest.mark.parallel(nprocs=[2])
def test_stall_report_names_link_call_and_shape_then_keeps_waiting():
    comm = MPI.COMM_WORLD.Dup()
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    link.label = '/model/bn7'
    x = numpy.random.RandomState(comm.rank).randn(2, 3).astype(numpy.float32)
    link(x)
    stream = io.StringIO()
    previous = communication.set_stall_policy(0.5, 'report', stream)
    try:
        if comm.rank == 1:
            time.sleep(2.0)  # a late rank: rank 0 waits and reports
        y = link(x)
    finally:
        communication.set_stall_policy(previous.timeout, previous.action,
                                       previous.stream)
    assert y.shape == (2, 3)
    if comm.rank == 0:
        line = stream.getvalue()
        assert 'rank 0 has waited' in line, line
        assert '/model/bn7' in line and 'call 2' in line, line
        assert '(2, 3)' in line, line
        assert line.count('\n') == 1
    else:
        assert stream.getvalue() == ''
    comm.Free()


@pytest.mark.parallel(nprocs=[2])
def test_stall_with_raise_action_raises_instead_of_hanging():
    comm = MPI.COMM_WORLD.Dup()  # left with a pending exchange: not reused
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    x = numpy.ones((2, 3), numpy.float32)
    link(x)
    previous = communication.set_stall_policy(1.0, 'raise', io.StringIO())
    try:
        if comm.rank == 0:  # a branch taken on rank 0 only
            start = time.monotonic()
            with pytest.raises(communication.StallError, match='call 2'):
                link(x)
            assert time.monotonic() - start < 10
    finally:
        communication.set_stall_policy(previous.timeout, previous.action,
                                       previous.stream)


def test_stall_policy_from_environment():
    env = communication.StallPolicy.from_environment
    assert env({}).timeout == 60.0 and env({}).action == 'report'
    assert env({'MULTINODE_BN_STALL_TIMEOUT': 'off'}).timeout is None
    assert env({'MULTINODE_BN_STALL_TIMEOUT': '0'}).timeout is None
    policy = env({'MULTINODE_BN_STALL_TIMEOUT': '2.5',
                  'MULTINODE_BN_STALL_ACTION': 'raise'})
    assert policy.timeout == 2.5 and policy.action == 'raise'
    with pytest.raises(ValueError, match='action'):
        communication.StallPolicy(1, 'explode')


def test_stall_policy_gives_up_after_half_an_hour_by_default():
    env = communication.StallPolicy.from_environment
    assert env({}).abort_after == 1800.0
    assert communication.StallPolicy().abort_after == 1800.0
    assert env({'MULTINODE_BN_STALL_ABORT': '7200'}).abort_after == 7200.0
    assert env({'MULTINODE_BN_STALL_ABORT': 'off'}).abort_after is None
    assert communication.StallPolicy(abort_after=0).abort_after is None
    with pytest.warns(RuntimeWarning, match='MULTINODE_BN_STALL_ABORT'):
        assert env({'MULTINODE_BN_STALL_ABORT': '-3'}).abort_after == 1800.0
    with pytest.raises(ValueError, match='abort_after'):
        communication.StallPolicy(abort_after=float('nan'))


@pytest.mark.parallel(nprocs=[2, 3])
def test_a_rank_that_skips_a_call_ends_the_others_after_the_limit():
    # The default action reports at the first limit and keeps waiting; at
    # the second the waiting processes raise, which ends the job under
    # `python -m mpi4py` instead of holding the nodes for ever.
    comm = MPI.COMM_WORLD.Dup()  # left with a pending exchange: not reused
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    x = numpy.ones((2, 3), numpy.float32)
    link(x)
    stream = io.StringIO()
    previous = communication.set_stall_policy(0.3, 'report', stream,
                                              abort_after=1.5)
    try:
        if comm.rank != 1:  # rank 1 skips the call
            start = time.monotonic()
            with pytest.raises(communication.StallError, match='Giving up'):
                link(x)
            assert 1.5 < time.monotonic() - start < 10
            lines = stream.getvalue().splitlines()
            assert len(lines) == 2 and 'call 2' in lines[0], lines
            assert 'MULTINODE_BN_STALL_ABORT' in lines[1], lines
    finally:
        communication.set_stall_policy(previous.timeout, previous.action,
                                       previous.stream, previous.abort_after)


def test_input_record_round_trip_and_local_problems():
    record = validation.input_record(
        (2, 3, 4, 5), numpy.float32, (3,), numpy.float32, (0, 2, 3), 'mpi',
        'cpu', version='1.2.3')._replace(text='/bn call 4', nonfinite=True)
    packed = record.pack()
    assert packed.shape == (validation.RECORD_LEN,)
    assert validation.InputRecord.unpack(packed) == record
    assert record.agreeing == (4, (0, 2, 3), (3,), (3,), 'float32',
                               'float32', 'mpi', 'cpu')
    garbage = validation.InputRecord.unpack(numpy.arange(
        validation.RECORD_LEN))
    assert not garbage.valid
    lp = validation.local_problem
    args = dict(x_shape=(2, 3), x_dtype=numpy.float32, param_shape=(3,),
                param_dtype=numpy.float32, beta_dtype=numpy.float32,
                axis=(0,), backend='mpi', x_device='cpu', param_device='cpu')
    assert lp(**args) == validation.OK
    assert lp(**dict(args, x_device='gpu')) == validation.DEVICE_MISMATCH
    assert lp(**dict(args, backend='nccl')) == validation.NCCL_NEEDS_GPU
    assert lp(**dict(args, x_dtype=numpy.int64)) == validation.NOT_FLOAT
    assert lp(**dict(args, axis=(0, 5))) == validation.BAD_AXIS
    assert lp(**dict(args, param_shape=(4,))) == validation.CHANNEL_MISMATCH
    assert lp(**dict(args, beta_dtype=numpy.float64)) == \
        validation.DTYPE_MISMATCH


def test_single_process_bad_input_errors_are_clear():
    link = multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_SELF)
    with pytest.raises(InconsistentInputError, match='not floating point'):
        link(numpy.zeros((2, 3), numpy.int32))
    with pytest.raises(InconsistentInputError, match='channels do not match'):
        link(numpy.zeros((2, 4), numpy.float32))
    with pytest.raises(InconsistentInputError, match='no batch axis'):
        link(numpy.zeros(3, numpy.float32))


ABORT_SCRIPT = textwrap.dedent('''
    import numpy, sys
    from mpi4py import MPI
    import multinode_bn
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    x = numpy.random.randn(4, 3).astype(numpy.float32)
    for step in range(5):
        if step == 2 and comm.rank == 1:
            raise RuntimeError('simulated failure on rank 1')
        y = link(x)
        link.cleargrads()
        y.grad = numpy.ones_like(x)
        y.backward()
    print('rank', comm.rank, 'finished')
''')


def test_exception_on_one_rank_aborts_the_whole_job_when_launched_via_mpi4py(
        tmp_path):
    script = tmp_path / 'train.py'
    script.write_text(ABORT_SCRIPT)
    mpiexec = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
    env = dict(os.environ, MULTINODE_BN_STALL_TIMEOUT='off')
    env.pop('_PYTEST_MPI_CHILD_PROCESS', None)
    start = time.monotonic()
    proc = subprocess.run(
        [mpiexec, '-n', '2', sys.executable, '-m', 'mpi4py', str(script)],
        capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert 'simulated failure on rank 1' in proc.stderr
    assert 'finished' not in proc.stdout
    assert elapsed < 60, elapsed


@parallel
def test_parameter_problem_on_one_rank_raises_on_every_rank():
    """Chainer's own type check would raise on that rank only."""
    comm = MPI.COMM_WORLD
    selector = multinode_bn.functions.MultiNodeBNImplSelector(comm, 'auto')
    x = numpy.random.RandomState(comm.rank).randn(4, 3).astype(
        numpy.float32)
    gamma = numpy.ones(3, numpy.float32)
    good_beta = numpy.zeros(3, numpy.float32)
    multinode_bn.multi_node_batch_normalization(x, gamma, good_beta, selector)
    bad = [(gamma, numpy.zeros((1, 3), numpy.float32)),   # beta shape
           (gamma.astype(numpy.int32), good_beta.astype(numpy.int32))]
    for g, b in bad:
        mine = (g, b) if comm.rank == 1 else (gamma, good_beta)
        start = time.monotonic()
        with pytest.raises(InconsistentInputError, match='rank\\(s\\) 1'):
            multinode_bn.multi_node_batch_normalization(x, mine[0], mine[1],
                                                        selector)
        assert time.monotonic() - start < 10


def test_lazy_link_conversion_keeps_pending_initial_statistics():
    import chainer.links as L
    bn = L.BatchNormalization(None, axis=0, initial_avg_mean=1.0,
                              initial_avg_var=4.0)
    synced = multinode_bn.create_mnbn_model(bn, MPI.COMM_SELF)
    back = multinode_bn.revert_mnbn_model(synced)
    x = numpy.full((2, 3), 3.0, numpy.float32)
    with chainer.using_config('train', False):
        for link in (bn, synced, back):
            numpy.testing.assert_allclose(link(x).array, 1.0, rtol=1e-4)


@pytest.mark.parallel(nprocs=[2, 3])
def test_processes_running_other_versions_raise_naming_the_versions(
        monkeypatch):
    # A stale install on one node: every process raises on the first
    # exchange, with each rank's version, before anything is computed.
    comm = MPI.COMM_WORLD
    if comm.rank == 1:
        monkeypatch.setattr(multinode_bn, '__version__', '0.0.1-stale')
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    try:
        link(numpy.ones((2, 3), numpy.float32))
        message = 'no error'
    except multinode_bn.InconsistentInputError as e:
        message = str(e)
    everyone = comm.allgather(message)
    for text in everyone:
        assert 'different versions' in text, everyone
        assert 'rank 0: multinode_bn {}'.format(
            multinode_bn.__version__ if comm.rank != 1 else '0.1.0') in text
        assert 'rank 1: multinode_bn 0.0.1-stale' in text, everyone


@pytest.mark.parallel(nprocs=[2])
def test_mismatch_reports_name_every_configuration_field():
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    x = numpy.ones((2, 3), numpy.float32)
    link(x)
    try:  # rank 1 fine-tunes, rank 0 trains
        link(x, finetune=comm.rank == 1)
        message = 'no error'
    except multinode_bn.InconsistentInputError as e:
        message = str(e)
    # (fine-tuning averages with decay 1 - 1 / (N + 1), 0 at first)
    for rank, decay, finetune in ((0, 0.9, False), (1, 0.0, True)):
        assert ('rank {}: MultiNodeBatchNormalization #'.format(rank)
                in message), message
        assert ('eps=2e-05 decay={} use_gamma=True use_beta=True '
                'finetune={}'.format(decay, finetune)) in message, message
