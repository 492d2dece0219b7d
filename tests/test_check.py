"""``python -m multinode_bn.check``: the table of processes, the exactness
check of the link, the verdict and the exit status, in-process under 1, 2
and 3 processes and as a command under ``mpiexec -n 2``."""

import io
import os
import subprocess
import sys
import time
import types

import numpy
import pytest

import chainer
import chainer.links as L
from mpi4py import MPI

import multinode_bn
from multinode_bn import check

parallel = pytest.mark.parallel(nprocs=[2, 3])
QUICK = ['--calls', '20', '--timeout', '60']
MPIEXEC = os.path.join(os.path.dirname(sys.executable), 'mpiexec')


def _run_main(**kwargs):
    """``check.main`` on COMM_WORLD: exit status, rank 0's report, and
    every rank's exit status."""
    out = io.StringIO()
    code = check.main(QUICK, comm=MPI.COMM_WORLD, stream=out, **kwargs)
    return code, out.getvalue(), MPI.COMM_WORLD.allgather(code)


def _subprocess_environment():
    env = dict(os.environ)
    # A job of its own, not a child of this pytest's MPI plugin.
    env.pop('_PYTEST_MPI_CHILD_PROCESS', None)
    return env


def _mpiexec(args, timeout=120):
    start = time.monotonic()
    proc = subprocess.run([MPIEXEC, '-n', '2'] + args, capture_output=True,
                          text=True, timeout=timeout,
                          env=_subprocess_environment())
    return proc, time.monotonic() - start


def test_run_link_gives_the_step_of_the_paper_formulas():
    """The step the check runs on Chainer's link (its reference) and ours,
    against float64 NumPy (Ioffe & Szegedy, 2015)."""
    x, gy = (a.astype(numpy.float64) for a in check.local_batch(2, 'f8'))
    link = L.BatchNormalization(check.CHANNELS, dtype=numpy.float64,
                                initial_gamma=check.GAMMA,
                                initial_beta=check.BETA)
    got = check.run_link(link, x, gy)
    axes, m = (0, 2, 3), x.size // x.shape[1]
    mean, var = x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
    xhat = (x - mean) / numpy.sqrt(var + link.eps)
    gamma = check.GAMMA.reshape(mean.shape)
    gbeta = gy.sum(axes, keepdims=True)
    ggamma = (gy * xhat).sum(axes, keepdims=True)
    expected = {
        'y': gamma * xhat + check.BETA.reshape(mean.shape),
        'gx': gamma / numpy.sqrt(var + link.eps) * (
            gy - (gbeta + xhat * ggamma) / m),
        'ggamma': ggamma.ravel(), 'gbeta': gbeta.ravel(),
        'avg_mean': (1 - link.decay) * mean.ravel(),
        'avg_var': link.decay + (1 - link.decay) * var.ravel() * m / (m - 1)}
    assert sorted(got) == sorted(expected)
    for name in expected:
        numpy.testing.assert_allclose(got[name], expected[name], rtol=1e-12,
                                      atol=1e-12, err_msg=name)


def test_table_marks_each_value_that_differs_from_rank_0():
    row = dict(rank=0, host='a', python='3.11.7', numpy='1.23.5',
               chainer='7.8.1', mpi4py='4.1.2', multinode_bn='0.1.0',
               mpi='MPICH 4.2.1', c_loops='yes', cupy='-', nccl='-',
               devices='-')
    rows = [row, dict(row, rank=1, host='b', devices='1 x GPU'),
            dict(row, rank=2, mpi='Open MPI v4.1.5', c_loops='no')]
    lines, problems = check.format_table(rows)
    assert problems == ['C loops differs', 'MPI library differs']
    assert lines[0].split()[:3] == ['rank', 'host', 'Python']
    assert [line.split()[0] for line in lines[1:4]] == ['0', '1', '2']
    assert 'Open MPI v4.1.5*' in lines[3] and ' no* ' in lines[3]
    assert '*' not in lines[1] + lines[2]   # host, devices may differ
    assert lines[4:] == [
        '  * rank 2 has MPI library Open MPI v4.1.5 (rank 0: MPICH 4.2.1)',
        '  * rank 2 has C loops no (rank 0: yes)']


def test_cuda_columns_name_cupy_nccl_and_devices(monkeypatch):
    # A stand-in for CuPy: the columns read only these attributes.
    cupy = types.ModuleType('cupy')
    cupy.__version__ = '13.3.0'
    cupy.cuda = types.ModuleType('cupy.cuda')
    cupy.cuda.nccl = types.SimpleNamespace(get_version=lambda: 21805)
    cupy.cuda.runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 4,
        getDeviceProperties=lambda i: {'name': b'NVIDIA H100'})
    monkeypatch.setitem(sys.modules, 'cupy', cupy)
    monkeypatch.setitem(sys.modules, 'cupy.cuda', cupy.cuda)
    info = check.describe_process()
    assert (info['cupy'], info['nccl'], info['devices']) == (
        '13.3.0', '2.18.5', '4 x NVIDIA H100')

    def no_device():
        raise RuntimeError('no CUDA-capable device is detected')
    cupy.cuda.runtime.getDeviceCount = no_device
    del cupy.cuda.nccl
    info = check.describe_process()
    assert (info['cupy'], info['nccl'], info['devices']) == (
        '13.3.0', '-', 'none (RuntimeError)')


def test_check_passes_in_one_process():
    code, report, _ = _run_main()
    assert code == 0, report
    assert report.splitlines()[-1].startswith('multinode_bn check: ok')
    assert 'nothing is exchanged' in report


@parallel
def test_check_passes_on_every_process():
    code, report, codes = _run_main()
    assert codes == [0] * MPI.COMM_WORLD.size
    if MPI.COMM_WORLD.rank == 0:
        lines = report.splitlines()
        assert lines[0].startswith('multinode_bn check: {} processes'.format(
            MPI.COMM_WORLD.size))
        ranks = [line.split()[0] for line in lines[2:2 + MPI.COMM_WORLD.size]]
        assert ranks == [str(r) for r in range(MPI.COMM_WORLD.size)]
        assert 'differs' not in report and '*' not in report
        assert report.count('statistics bit-identical: yes') == 2
        assert 'its exchange alone (29 float64, Iallreduce)' in report
        assert 'plain Allreduce of 29 float64' in report
        assert lines[-1].startswith('multinode_bn check: ok')
    else:
        assert report == ''   # only rank 0 writes


@parallel
def test_version_difference_fails_every_process_and_marks_its_row():
    world = MPI.COMM_WORLD
    last = world.size - 1
    code, report, codes = _run_main(
        versions_override={'numpy': '1.22.0'} if world.rank == last
        else None)
    assert codes == [1] * world.size
    if world.rank == 0:
        rows = report.splitlines()[2:2 + world.size]
        assert ' 1.22.0* ' in rows[last]
        assert all('*' not in rows[r] for r in range(last))
        assert report.splitlines()[-1].startswith(
            'multinode_bn check: FAILED (NumPy differs)')


class _LocalBatchNormalization(L.BatchNormalization):
    """Takes a communicator but normalizes with the local batch only."""

    def __init__(self, size, comm, **kwargs):
        super().__init__(size, **kwargs)


@parallel
def test_unsynchronized_link_fails_the_exactness_check(monkeypatch):
    monkeypatch.setattr(multinode_bn, 'MultiNodeBatchNormalization',
                        _LocalBatchNormalization)
    code, report, codes = _run_main()
    assert codes == [1] * MPI.COMM_WORLD.size
    if MPI.COMM_WORLD.rank == 0:
        assert report.count('TOO LARGE') == 2, report
        assert 'float32 error' in report.splitlines()[-1]


def test_command_under_mpiexec_prints_table_and_ok():
    proc, seconds = _mpiexec([sys.executable, '-m', 'multinode_bn.check'])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith('multinode_bn check: 2 processes')
    assert [line.split()[0] for line in lines[2:4]] == ['0', '1']
    assert lines[-1].startswith('multinode_bn check: ok')
    assert proc.stdout.count('multinode_bn check: 2 processes') == 1
    assert seconds < 30


def test_command_exits_non_zero_when_a_version_differs(tmp_path):
    script = tmp_path / 'mixed.py'
    script.write_text(
        'import sys\n'
        'from mpi4py import MPI\n'
        'from multinode_bn import check\n'
        "other = {'chainer': '7.0.0'} if MPI.COMM_WORLD.rank == 1 else None\n"
        'sys.exit(check.main(versions_override=other))\n')
    proc, _ = _mpiexec([sys.executable, str(script)])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert ' 7.0.0* ' in proc.stdout.splitlines()[3]
    assert 'FAILED (Chainer differs)' in proc.stdout


def test_missing_process_is_reported_and_ends_the_job(tmp_path):
    script = tmp_path / 'missing.py'
    script.write_text(
        'import sys, time\n'
        'from mpi4py import MPI\n'
        'from multinode_bn import check\n'
        'if MPI.COMM_WORLD.rank == 0:\n'
        "    sys.argv[1:] = ['--timeout', '2']\n"
        '    check.cli()\n'
        'time.sleep(60)   # never joins; ended with the job\n')
    proc, seconds = _mpiexec([sys.executable, str(script)])
    assert proc.returncode != 0
    assert ('rank 0 has waited 2 s in multinode_bn.check, waiting for all 2 '
            'processes to start') in proc.stderr
    assert 'multinode_bn check: FAILED (rank 0 waited 2 s' in proc.stdout
    assert seconds < 50


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable),
                          'multinode-bn-check')
    proc = subprocess.run([script, '--help'], capture_output=True, text=True,
                          timeout=60, env=_subprocess_environment())
    assert proc.returncode == 0 and '--timeout' in proc.stdout
