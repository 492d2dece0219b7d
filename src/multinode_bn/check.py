"""A self-check of an MPI job before a long run.

Run as ``mpiexec -n N python -m multinode_bn.check`` (or
``multinode-bn-check``).

Every process of the job (of ``MPI.COMM_WORLD``) takes part; rank 0 writes:

* one table with a row per process: host, rank, the versions of Python,
  NumPy, Chainer, mpi4py and multinode_bn, the MPI library, whether the C
  loops of :mod:`multinode_bn.cpu_kernels` are loaded, and CuPy, NCCL and
  the devices where CuPy is installed. A value that differs from rank 0's
  is marked ``*``, its row ``!``, and each difference is listed;
* a synchronized batch normalization (the public link,
  :class:`~multinode_bn.MultiNodeBatchNormalization`) forward and backward
  on local batches of different sizes, in float32 and float64, compared on
  every process with float64 NumPy on the gathered batch (output, input
  gradient, parameter gradients summed over processes, running
  statistics): the largest error, and whether the running statistics are
  bit-identical on every process;
* the median time of a training-mode forward of a small link (one
  exchange) beside a plain ``Allreduce`` of the statistics it sums;
* one verdict line, ``multinode_bn check: ok`` or ``multinode_bn check:
  FAILED (...)``.

The exit status is 0 when the processes agree and the link is exact, 1
when not, 2 when a process did not join within ``--timeout`` seconds (the
stall report names the step; the job is then aborted, since a collective is
left waiting). It takes a few seconds; nothing waits without a bound.
"""

import argparse
import importlib.util
import platform
import sys
import time

import numpy

from multinode_bn import communication

#: Errors allowed against the float64 reference, relative to the largest
#: value of each quantity, per dtype of the link.
TOLERANCE = {'float32': 1e-5, 'float64': 1e-12}

#: Exit status when a process did not join in time.
EXIT_STALL = 2

#: Table columns: (key of a process's description, heading, compared
#: between processes).
COLUMNS = (('rank', 'rank', False),
           ('host', 'host', False),
           ('python', 'Python', True),
           ('numpy', 'NumPy', True),
           ('chainer', 'Chainer', True),
           ('mpi4py', 'mpi4py', True),
           ('multinode_bn', 'multinode_bn', True),
           ('mpi', 'MPI library', True),
           ('c_loops', 'C loops', True),
           ('cupy', 'CuPy', True),
           ('nccl', 'NCCL', True),
           ('devices', 'devices', False))

CHANNELS = 8
SPATIAL = (5, 7)


def describe_process(versions_override=None):
    """What this process runs: the values of one row of the table.

    Args:
        versions_override (dict): Values that replace the ones found, by
            column key (``'numpy'``, ``'mpi'``, ...), to simulate a mixed
            installation in tests.

    Returns:
        dict: Column key to text.
    """
    import chainer
    import mpi4py
    from mpi4py import MPI

    import multinode_bn
    from multinode_bn import cpu_kernels

    library = MPI.Get_library_version().strip().splitlines()[0]
    library = ' '.join(library.replace('Version:', '').split()).split(',')[0]
    info = {'host': MPI.Get_processor_name(),
            'python': platform.python_version(),
            'numpy': numpy.__version__,
            'chainer': chainer.__version__,
            'mpi4py': mpi4py.__version__,
            'multinode_bn': multinode_bn.__version__,
            'mpi': library,
            'c_loops': 'yes' if cpu_kernels.available() else 'no'}
    info.update(_describe_cuda())
    info.update(versions_override or {})
    return info


def _describe_cuda():
    if 'cupy' not in sys.modules and importlib.util.find_spec('cupy') is None:
        return {'cupy': '-', 'nccl': '-', 'devices': '-'}
    try:
        import cupy
    except Exception as e:  # a broken CuPy is worth a row, not a crash
        return {'cupy': 'fails: {}'.format(type(e).__name__), 'nccl': '-',
                'devices': '-'}
    info = {'cupy': cupy.__version__, 'nccl': '-', 'devices': '-'}
    try:
        from cupy.cuda import nccl
        version = nccl.get_version()
        info['nccl'] = '{}.{}.{}'.format(version // 10000,
                                         version // 100 % 100, version % 100)
    except Exception:
        pass
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        name = cupy.cuda.runtime.getDeviceProperties(0)['name']
        if isinstance(name, bytes):
            name = name.decode()
        info['devices'] = '{} x {}'.format(count, name)
    except Exception as e:
        info['devices'] = 'none ({})'.format(type(e).__name__)
    return info


def differences(rows):
    """``(rank, heading, value, rank 0's value)`` of every compared value
    that differs from rank 0's."""
    found = []
    for row in rows[1:]:
        for key, heading, compared in COLUMNS:
            if compared and row.get(key) != rows[0].get(key):
                found.append((row['rank'], heading, row.get(key),
                              rows[0].get(key)))
    return found


def format_table(rows):
    """The table of processes, differences from rank 0 marked."""
    differing = {(rank, heading) for rank, heading, _, _ in differences(rows)}
    cells = [[heading for _, heading, _ in COLUMNS]]
    marks = ['']
    for row in rows:
        cells.append([str(row.get(key, '?')) + (
            '*' if (row['rank'], heading) in differing else '')
            for key, heading, _ in COLUMNS])
        marks.append('!' if any(r == row['rank'] for r, _ in differing)
                     else '')
    widths = [max(len(line[i]) for line in cells)
              for i in range(len(COLUMNS))]
    return ['{:1} '.format(mark) + '  '.join(
        c.ljust(w) for c, w in zip(line, widths)).rstrip()
        for mark, line in zip(marks, cells)]


def local_batch_size(rank):
    """Uneven local batches: 1, 2, 3, 1, 2, 3, ... images."""
    return 1 + rank % 3


def _inputs(rank, dtype):
    """This process's input and upstream gradient (float64 values exactly
    representable in ``dtype``)."""
    rng = numpy.random.RandomState(1000 + rank)
    shape = (local_batch_size(rank), CHANNELS) + SPATIAL
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    return x, gy


def _parameters(dtype):
    rng = numpy.random.RandomState(7)
    return (rng.uniform(0.5, 1.5, CHANNELS).astype(dtype),
            rng.standard_normal(CHANNELS).astype(dtype))


def reference_batch_normalization(x, gy, gamma, beta, eps, decay):
    """Batch normalization of one whole batch in float64 NumPy.

    The formulas of the original paper (Ioffe & Szegedy, 2015), channels on
    axis 1, independent of the code under test.

    Args:
        x (numpy.ndarray): The whole batch, ``(N, C, ...)``.
        gy (numpy.ndarray): Upstream gradient, shaped like ``x``.
        gamma (numpy.ndarray): Scale, ``(C,)``.
        beta (numpy.ndarray): Shift, ``(C,)``.
        eps (float): Added to the variance.
        decay (float): Decay of the running averages, which start at mean 0
            and variance 1.

    Returns:
        dict: ``y``, ``gx``, ``ggamma``, ``gbeta``, ``avg_mean``,
        ``avg_var``.
    """
    x = numpy.asarray(x, numpy.float64)
    gy = numpy.asarray(gy, numpy.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    m = x.size // x.shape[1]
    mean = x.mean(axis=axes)
    var = ((x - mean.reshape(shape)) ** 2).mean(axis=axes)
    inv_std = 1.0 / numpy.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
    g = numpy.asarray(gamma, numpy.float64)
    gbeta = gy.sum(axis=axes)
    ggamma = (gy * xhat).sum(axis=axes)
    gx = (g * inv_std).reshape(shape) * (
        gy - (gbeta.reshape(shape) + xhat * ggamma.reshape(shape)) / m)
    return {'y': g.reshape(shape) * xhat + numpy.asarray(
                beta, numpy.float64).reshape(shape),
            'gx': gx, 'ggamma': ggamma, 'gbeta': gbeta,
            'avg_mean': (1 - decay) * mean,
            'avg_var': decay + (1 - decay) * var * m / max(m - 1, 1)}


def _run_link(comm, dtype):
    """One forward and backward of the link on this process's batch."""
    import chainer

    import multinode_bn

    x, gy = _inputs(comm.rank, dtype)
    gamma, beta = _parameters(dtype)
    link = multinode_bn.MultiNodeBatchNormalization(CHANNELS, comm,
                                                    dtype=dtype)
    link.label = 'multinode_bn.check ({})'.format(dtype)
    link.gamma.array[...] = gamma
    link.beta.array[...] = beta
    xv = chainer.Variable(x)
    y = link(xv)
    link.cleargrads()
    y.grad = gy
    y.backward()
    return {'y': y.array, 'gx': xv.grad, 'ggamma': link.gamma.grad,
            'gbeta': link.beta.grad, 'avg_mean': link.avg_mean,
            'avg_var': link.avg_var, 'eps': link.eps, 'decay': link.decay}


def _relative_error(actual, expected):
    expected = numpy.asarray(expected, numpy.float64)
    scale = max(float(numpy.abs(expected).max(initial=0.0)), 1e-300)
    return float(numpy.abs(numpy.asarray(actual, numpy.float64)
                           - expected).max(initial=0.0)) / scale


def check_exactness(comm, dtype, timeout):
    """The link against the float64 reference, on every process.

    Collective over ``comm``: each process runs the link on its batch,
    the batches and results are gathered (small objects), and each process
    compares every process's slice and the summed parameter gradients, so
    that all reach the same verdict.

    Args:
        comm (mpi4py.MPI.Comm): The processes.
        dtype (str): ``'float32'`` or ``'float64'``.
        timeout (float): Seconds to wait for the other processes.

    Returns:
        dict: ``error`` (largest over processes and quantities),
        ``worst`` (its quantity and rank), ``identical`` (running
        statistics bit-identical on every process), ``failure`` (text of the
        exceptions raised on some processes, or ``None``).
    """
    try:
        ours = _run_link(comm, numpy.dtype(dtype))
        failure = None
    except communication.StallError:
        raise
    except Exception as e:
        ours, failure = None, 'rank {}: {}: {}'.format(
            comm.rank, type(e).__name__, e)
    gathered = _gather(comm, (_inputs(comm.rank, dtype), ours, failure),
                       timeout, 'gathering the {} results'.format(dtype))
    failures = [f for _, _, f in gathered if f]
    if failures:
        return {'error': float('nan'), 'worst': None, 'identical': False,
                'failure': '; '.join(failures)}
    xs = [x for (x, _), _, _ in gathered]
    gys = [gy for (_, gy), _, _ in gathered]
    results = [r for _, r, _ in gathered]
    gamma, beta = _parameters(dtype)
    ref = reference_batch_normalization(
        numpy.concatenate(xs), numpy.concatenate(gys), gamma, beta,
        ours['eps'], ours['decay'])
    errors = []
    offset = 0
    for rank, (x, r) in enumerate(zip(xs, results)):
        n = len(x)
        for name in ('y', 'gx'):
            errors.append((_relative_error(r[name],
                                           ref[name][offset:offset + n]),
                           name, rank))
        for name in ('avg_mean', 'avg_var'):
            errors.append((_relative_error(r[name], ref[name]), name, rank))
        offset += n
    for name in ('ggamma', 'gbeta'):
        summed = numpy.sum([numpy.asarray(r[name], numpy.float64)
                            for r in results], axis=0)
        errors.append((_relative_error(summed, ref[name]),
                       name + ' summed over processes', None))
    # NaN counts as the largest error.
    error, what, rank = max(errors, key=lambda e: (e[0] != e[0], e[0]))
    identical = all(
        r[name].tobytes() == results[0][name].tobytes()
        for r in results for name in ('avg_mean', 'avg_var'))
    return {'error': error, 'worst': (what, rank), 'identical': identical,
            'failure': None}


def measure_latency(comm, calls):
    """Median seconds of a link's training-mode forward (one exchange) and
    of a plain ``Allreduce`` of the ``1 + 2C`` float64 sums it exchanges.

    Args:
        comm (mpi4py.MPI.Comm): The processes.
        calls (int): Timed calls of each.

    Returns:
        tuple: ``(link seconds, Allreduce seconds)`` on this process.
    """
    import chainer
    from mpi4py import MPI

    import multinode_bn

    link = multinode_bn.MultiNodeBatchNormalization(CHANNELS, comm)
    link.label = 'multinode_bn.check (latency)'
    x = numpy.arange(4 * CHANNELS, dtype=numpy.float32).reshape(4, CHANNELS)
    send = numpy.ones(1 + 2 * CHANNELS)
    receive = numpy.empty_like(send)
    link_times, allreduce_times = [], []
    with chainer.no_backprop_mode():
        for _ in range(WARM_UP + calls):
            start = time.perf_counter()
            link(x)
            link_times.append(time.perf_counter() - start)
            # The baseline: the same amount of data in one plain collective.
            start = time.perf_counter()
            comm.Allreduce(send, receive, op=MPI.SUM)
            allreduce_times.append(time.perf_counter() - start)
    return (float(numpy.median(link_times[WARM_UP:])),
            float(numpy.median(allreduce_times[WARM_UP:])))


WARM_UP = 10


def _gather(comm, obj, timeout, step):
    """Every process's ``obj``, in rank order, once every process has
    reached ``step``; :class:`~multinode_bn.StallError` (after the stall
    report) when one has not within ``timeout`` seconds, instead of a
    blocking gather that would wait forever."""
    policy = communication.StallPolicy(timeout, 'raise')
    communication.wait(comm.Ibarrier(), comm.rank,
                       lambda: 'multinode_bn.check, ' + step, policy)
    return communication.allgather_objects(comm, obj)


def _start(comm, timeout):
    """A duplicate of ``comm`` for the check, once every process has
    started (the first collective: a missing process is reported here)."""
    dup, request = comm.Idup()
    communication.wait(
        request, comm.Get_rank(),
        lambda: 'multinode_bn.check, waiting for all {} processes to start '
        '(Idup)'.format(comm.Get_size()),
        communication.StallPolicy(timeout, 'raise'))
    return dup


def processes_section(comm, timeout, versions_override=None):
    """Lines of the table of processes, and the problems found."""
    info = describe_process(versions_override)
    info['rank'] = comm.rank
    rows = _gather(comm, info, timeout, 'gathering what each process runs')
    hosts = len({row['host'] for row in rows})
    lines = ['multinode_bn check: {} process{} on {} host{}'.format(
        len(rows), 'es' if len(rows) > 1 else '', hosts,
        's' if hosts > 1 else '')]
    lines += format_table(rows)
    problems = []
    for rank, heading, value, expected in differences(rows):
        lines.append('! rank {} has {} {} (rank 0: {})'.format(
            rank, heading, value, expected))
        problems.append('{} differs'.format(heading))
    if all(row['c_loops'] == 'no' for row in rows):
        lines.append('  (C loops not built: the NumPy code is used, slower, '
                     'with the same results)')
    return lines, problems


def exactness_section(comm, timeout):
    """Lines of the exactness check of the link, and the problems found."""
    lines = ['synchronized BN forward + backward against float64 NumPy on '
             'the gathered batch',
             '(local batches of {}; C={}, {}x{}; running statistics '
             'compared bit for bit):'.format(
                 ', '.join(str(local_batch_size(r))
                           for r in range(comm.size)), CHANNELS, *SPATIAL)]
    problems = []
    for dtype in ('float32', 'float64'):
        result = check_exactness(comm, dtype, timeout)
        if result['failure']:
            lines.append('  {}  FAILED: {}'.format(dtype, result['failure']))
            problems.append('the {} link raised'.format(dtype))
            continue
        what, worst_rank = result['worst']
        ok = result['error'] <= TOLERANCE[dtype]
        lines.append(
            '  {}  max error {:.1e}{} (tolerance {:.0e}, worst: {}{})  '
            'statistics bit-identical: {}'.format(
                dtype, result['error'], '' if ok else ' TOO LARGE',
                TOLERANCE[dtype], what,
                '' if worst_rank is None else ' on rank {}'.format(
                    worst_rank),
                'yes' if result['identical'] else 'NO'))
        if not ok:
            problems.append('{} error {:.1e} above {:.0e}'.format(
                dtype, result['error'], TOLERANCE[dtype]))
        if not result['identical']:
            problems.append('{} running statistics differ between '
                            'processes'.format(dtype))
    return lines, problems


def latency_section(comm, timeout, calls):
    """Lines of the exchange latency beside a plain ``Allreduce``."""
    _gather(comm, None, timeout, 'before timing the exchange')
    times = _gather(comm, measure_latency(comm, calls), timeout,
                    'gathering the times')
    lines = ['median of {} calls, slowest process:'.format(calls),
             '  link forward (training, one exchange), C={}  {:>9}'.format(
                 CHANNELS, _microseconds(max(t[0] for t in times))),
             '  plain Allreduce of {} float64               {:>9}'.format(
                 1 + 2 * CHANNELS, _microseconds(max(t[1] for t in times)))]
    if comm.size == 1:
        lines.append('  (1 process: nothing is exchanged; run it as '
                     '`mpiexec -n N python -m multinode_bn.check`)')
    return lines


def _microseconds(seconds):
    return '{:.0f} us'.format(seconds * 1e6)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        prog='python -m multinode_bn.check',
        description='Checks that the processes of an MPI job agree and that '
        'synchronized batch normalization is exact across them. Run as '
        '`mpiexec -n N python -m multinode_bn.check`.')
    parser.add_argument('--timeout', type=float, default=30.0,
                        help='seconds to wait for the other processes at '
                        'each step (default 30)')
    parser.add_argument('--calls', type=int, default=200,
                        help='timed calls for the latency (default 200)')
    return parser.parse_args(argv)


def main(argv=None, comm=None, versions_override=None, stream=None):
    """Runs the check on every process of ``comm``; rank 0 writes the report.

    Args:
        argv (list of str): Command-line arguments (``--timeout``,
            ``--calls``); ``sys.argv[1:]`` by default.
        comm (mpi4py.MPI.Comm): The processes to check (default
            ``MPI.COMM_WORLD``). The check runs on a duplicate of it.
        versions_override (dict): Values that replace this process's own in
            the table, by column key (for example ``{'numpy': '1.0'}``), to
            simulate a mixed installation.
        stream: Where rank 0 writes (default ``sys.stdout``).

    Returns:
        int: 0 when everything agrees and is exact, 1 when not (the same on
        every process), :data:`EXIT_STALL` when a process did not join in
        time (a collective is then left in flight on ``comm``: end the job).
    """
    from mpi4py import MPI

    import multinode_bn

    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    comm = MPI.COMM_WORLD if comm is None else comm
    out = stream or sys.stdout
    rank = comm.Get_rank()
    start = time.monotonic()
    lines = []
    previous = multinode_bn.get_stall_policy()
    # The link's own exchanges stall with an error too, not forever.
    multinode_bn.set_stall_policy(args.timeout, 'raise', previous.stream)
    try:
        dup = _start(comm, args.timeout)
        section, problems = processes_section(dup, args.timeout,
                                              versions_override)
        lines += section + ['']
        section, more = exactness_section(dup, args.timeout)
        lines += section + ['']
        problems += more
        lines += latency_section(dup, args.timeout, args.calls) + ['']
    except communication.StallError:
        # Every process that stalls says so: rank 0 may be the missing one.
        if rank == 0:
            print('\n'.join(lines), file=out, flush=True)
        print('multinode_bn check: FAILED (rank {} waited {:.0f} s for the '
              'other processes; see the report above)'.format(
                  rank, args.timeout), file=out, flush=True)
        return EXIT_STALL
    finally:
        multinode_bn.set_stall_policy(previous.timeout, previous.action,
                                      previous.stream)
    dup.Free()
    unique = sorted(set(problems), key=problems.index)
    lines.append('multinode_bn check: {} ({:.1f} s)'.format(
        'FAILED ({})'.format('; '.join(unique)) if unique else 'ok',
        time.monotonic() - start))
    if rank == 0:
        print('\n'.join(lines), file=out, flush=True)
    return 1 if problems else 0


def cli():
    """Entry point of ``python -m multinode_bn.check`` and
    ``multinode-bn-check``: exits with :func:`main`'s status, and aborts the
    job when a process did not join (a collective is left in flight)."""
    code = main()
    if code == EXIT_STALL:
        from mpi4py import MPI
        MPI.COMM_WORLD.Abort(code)
    sys.exit(code)


if __name__ == '__main__':
    cli()
