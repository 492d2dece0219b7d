"""The self-check of an MPI job (docs/usage.md, "Checking a cluster")."""

import argparse
import platform
import sys
import time

import chainer
import mpi4py
from mpi4py import MPI
import numpy

import multinode_bn
from multinode_bn import communication
from multinode_bn import validation
from multinode_bn import cpu_kernels

#: Errors allowed against float64 NumPy, relative to the largest value.
TOLERANCE = {'float32': 1e-5, 'float64': 1e-12}
EXIT_STALL = 2  # a process did not join in time

#: The table's columns: key of a process's description, and heading.
COLUMNS = (('rank', 'rank'), ('host', 'host'), ('python', 'Python'),
           ('numpy', 'NumPy'), ('chainer', 'Chainer'), ('mpi4py', 'mpi4py'),
           ('multinode_bn', 'multinode_bn'), ('mpi', 'MPI library'),
           ('c_loops', 'C loops'), ('cupy', 'CuPy'), ('nccl', 'NCCL'),
           ('devices', 'devices'))
#: Columns that may differ between processes; all others must agree.
MAY_DIFFER = ('rank', 'host', 'devices')

BATCH_SIZES = (1, 2, 3)  # the local batch of rank r: BATCH_SIZES[r % 3]
CHANNELS = 8
SPATIAL = (5, 7)


def describe_process(versions_override=None):
    """This process's row of the table, by column key; ``versions_override``
    replaces values (``{'numpy': '1.0'}``) to simulate a mixed install."""
    # "MPICH Version: 4.2.1 ..." or "Open MPI v4.1.5, package: ...".
    library = MPI.Get_library_version().strip().splitlines()[0]
    library = ' '.join(library.replace('Version:', '').split()).split(',')[0]
    info = {'host': MPI.Get_processor_name(), 'mpi': library,
            'python': platform.python_version(), 'numpy': numpy.__version__,
            'chainer': chainer.__version__, 'mpi4py': mpi4py.__version__,
            'multinode_bn': multinode_bn.__version__,
            'c_loops': 'yes' if cpu_kernels.available() else 'no',
            'cupy': '-', 'nccl': '-', 'devices': '-'}
    try:
        import cupy
    except Exception:  # not installed, or not loadable here
        cupy = None
    if cupy is not None:
        info['cupy'] = cupy.__version__
        try:
            from cupy.cuda import nccl
            v = nccl.get_version()
            info['nccl'] = '{}.{}.{}'.format(v // 10000, v // 100 % 100,
                                             v % 100)
        except Exception:
            pass  # CuPy without NCCL
        try:
            runtime = cupy.cuda.runtime
            name = runtime.getDeviceProperties(0)['name'].decode()
            info['devices'] = '{} x {}'.format(runtime.getDeviceCount(), name)
        except Exception as e:
            info['devices'] = 'none ({})'.format(type(e).__name__)
    info.update(versions_override or {})
    return info


def differences(rows):
    """``(rank, heading, value, rank 0's value)`` for each value that must
    agree but differs from rank 0's."""
    found = []
    for row in rows[1:]:
        for key, heading in COLUMNS:
            if key not in MAY_DIFFER and row.get(key) != rows[0].get(key):
                found.append((row['rank'], heading, row.get(key),
                              rows[0].get(key)))
    return found


def format_table(rows):
    """The table's lines; a value that differs from rank 0's is marked
    ``*``, its row ``!``, and listed below."""
    found = differences(rows)
    marked = {(rank, heading) for rank, heading, _, _ in found}
    table = [(' ', [heading for _, heading in COLUMNS])]
    for row in rows:
        mark, cells = ' ', []
        for key, heading in COLUMNS:
            cell = str(row.get(key, '?'))
            if (row['rank'], heading) in marked:
                mark, cell = '!', cell + '*'
            cells.append(cell)
        table.append((mark, cells))
    widths = [max(len(cells[i]) for _, cells in table)
              for i in range(len(COLUMNS))]
    lines = [mark + ' ' + '  '.join(c.ljust(w) for c, w in zip(cells, widths))
             .rstrip() for mark, cells in table]
    return lines + ['! rank {} has {} {} (rank 0: {})'.format(*difference)
                    for difference in found]


def reference_batch_normalization(x, gy, gamma, beta, eps, decay):
    """Batch normalization of ``x`` (channels on axis 1) in float64 NumPy,
    by the paper's formulas (Ioffe & Szegedy, 2015): ``y``, ``gx``,
    ``ggamma``, ``gbeta``, and ``avg_mean``, ``avg_var`` after one step."""
    x, gy = numpy.asarray(x, numpy.float64), numpy.asarray(gy, numpy.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    m = x.size // x.shape[1]
    mean = x.mean(axis=axes, keepdims=True)  # per channel, shaped like x
    var = x.var(axis=axes, keepdims=True)
    gamma = numpy.asarray(gamma, numpy.float64).reshape(mean.shape)
    beta = numpy.asarray(beta, numpy.float64).reshape(mean.shape)
    xhat = (x - mean) / numpy.sqrt(var + eps)
    gbeta = gy.sum(axis=axes, keepdims=True)
    ggamma = (gy * xhat).sum(axis=axes, keepdims=True)
    gx = gamma / numpy.sqrt(var + eps) * (gy - (gbeta + xhat * ggamma) / m)
    return {'y': gamma * xhat + beta, 'gx': gx,
            'ggamma': ggamma.ravel(), 'gbeta': gbeta.ravel(),
            'avg_mean': (1 - decay) * mean.ravel(),
            'avg_var': decay + (1 - decay) * var.ravel() * m / max(m - 1, 1)}


def run_link(comm, dtype):
    """The link's forward and backward on this process's batch: the inputs
    and the results."""
    rng = numpy.random.RandomState(1000 + comm.rank)
    shape = (BATCH_SIZES[comm.rank % 3], CHANNELS) + SPATIAL
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    gamma = numpy.linspace(0.5, 1.5, CHANNELS).astype(dtype)
    beta = numpy.linspace(-1.0, 1.0, CHANNELS).astype(dtype)
    link = multinode_bn.MultiNodeBatchNormalization(
        CHANNELS, comm, dtype=dtype, initial_gamma=gamma, initial_beta=beta)
    link.label = 'multinode_bn.check ({})'.format(dtype)
    xv = chainer.Variable(x)
    y = link(xv)
    link.cleargrads()  # backward adds to gradients, which start as NaN
    y.grad = gy
    y.backward()
    return {'x': x, 'gy': gy, 'gamma': gamma, 'beta': beta, 'y': y.array,
            'gx': xv.grad, 'ggamma': link.gamma.grad, 'gbeta': link.beta.grad,
            'avg_mean': link.avg_mean, 'avg_var': link.avg_var,
            'eps': link.eps, 'decay': link.decay}


def measure_latency(comm, calls):
    """Median seconds of a link's training-mode forward, of its exchange
    alone (one ``Iallreduce`` of the link's width: the tag and the
    ``1 + 2C`` sums), and of a plain ``Allreduce`` of as many float64."""
    link = multinode_bn.MultiNodeBatchNormalization(CHANNELS, comm)
    link.label = 'multinode_bn.check (latency)'
    x = numpy.arange(4 * CHANNELS, dtype=numpy.float32).reshape(4, CHANNELS)
    # An exchange as the link's: the tag and the sums, on a communicator
    # of its own.
    exchange = communication.create_exchange(comm, 'mpi')
    tag = validation.exchange_tag(validation.exchange_digest('check'))
    sums = numpy.zeros(1 + 2 * CHANNELS)
    width = exchange.width = tag.size + sums.size
    send, receive = numpy.ones(width), numpy.empty(width)
    times = [[], [], []]
    steps = (lambda: link(x), lambda: exchange.allreduce_sums(sums, tag),
             lambda: comm.Allreduce(send, receive, op=MPI.SUM))
    with chainer.no_backprop_mode():
        for _ in range(calls):
            for step, kept in zip(steps, times):
                start = time.perf_counter()
                step()
                kept.append(time.perf_counter() - start)
    return [numpy.median(t) for t in times] + [width]


def relative_error(actual, expected):
    """The largest error relative to the largest value; NaN counts as inf."""
    error = numpy.nan_to_num(numpy.abs(actual - expected).max(), nan=numpy.inf)
    return float(error) / max(float(numpy.abs(expected).max()), 1e-300)


def compare(results, dtype):
    """All :func:`run_link` results against the reference: line, problems."""
    whole = {name: numpy.concatenate([r[name] for r in results])
             for name in ('x', 'gy', 'y', 'gx')}
    first = results[0]
    ref = reference_batch_normalization(
        whole['x'], whole['gy'], first['gamma'], first['beta'], first['eps'],
        first['decay'])
    errors = {}  # by quantity
    for name in ('y', 'gx'):
        errors[name] = relative_error(whole[name], ref[name])
    for name in ('avg_mean', 'avg_var'):
        # Those of the other processes are compared bit for bit below.
        errors[name] = relative_error(first[name], ref[name])
    for name in ('ggamma', 'gbeta'):
        summed = sum(numpy.asarray(r[name], numpy.float64) for r in results)
        errors[name + ' summed over processes'] = relative_error(
            summed, ref[name])
    worst = max(errors, key=errors.get)
    identical = all(r[name].tobytes() == first[name].tobytes()
                    for r in results for name in ('avg_mean', 'avg_var'))
    ok = errors[worst] <= TOLERANCE[dtype]
    problems = []
    if not ok:
        problems.append('{} error {:.1e} above {:.0e}'.format(
            dtype, errors[worst], TOLERANCE[dtype]))
    if not identical:
        problems.append(dtype + ' running statistics differ between processes')
    return ('  {}  max error {:.1e}{} (tolerance {:.0e}, worst: {})  '
            'statistics bit-identical: {}'.format(
                dtype, errors[worst], '' if ok else ' TOO LARGE',
                TOLERANCE[dtype], worst, 'yes' if identical else 'NO'),
            problems)


def report(rows, calls):
    """The report's lines but the verdict, and the problems found."""
    hosts = len({row['host'] for row in rows})
    lines = ['multinode_bn check: {} process{} on {} host{}'.format(
        len(rows), 'es' if len(rows) > 1 else '', hosts,
        's' if hosts > 1 else '')] + format_table(rows)
    problems = sorted({heading + ' differs'
                       for _, heading, _, _ in differences(rows)})
    sizes = ', '.join(str(BATCH_SIZES[r % 3]) for r in range(len(rows)))
    lines += ['', 'synchronized BN forward + backward on local batches of {} '
              '(C={}, {}x{}) against float64 NumPy on the gathered batch:'
              .format(sizes, CHANNELS, *SPATIAL)]
    failures = [row['failure'] for row in rows if 'failure' in row]
    if failures:
        lines.append('  FAILED: ' + '; '.join(failures))
        return lines + [''], problems + ['the link raised']
    for dtype in ('float32', 'float64'):
        line, found = compare([row[dtype] for row in rows], dtype)
        lines.append(line)
        problems += found
    forward, exchange, allreduce, width = numpy.max(
        [r['latency'] for r in rows], 0)
    lines += ['', 'median of {} calls, slowest process:'.format(calls)]
    for what, seconds in (
            ('link forward (training), C={}'.format(CHANNELS), forward),
            ('its exchange alone ({:.0f} float64, Iallreduce)'.format(
                width), exchange),
            ('plain Allreduce of {:.0f} float64'.format(width), allreduce)):
        lines.append('  {:<46} {:>6.0f} us'.format(what, 1e6 * seconds))
    if len(rows) == 1:
        lines.append('  (1 process: nothing is exchanged; use mpiexec -n N)')
    return lines + [''], problems


def main(argv=None, comm=None, versions_override=None, stream=None):
    """Runs the check on every process of ``comm`` (default
    ``MPI.COMM_WORLD``); rank 0 writes the report to ``stream``. Returns the
    exit status, the same on every process (docs/api.md has the details)."""
    parser = argparse.ArgumentParser(
        prog='python -m multinode_bn.check', description='Checks an MPI job '
        'before a long run; run it as the job: `mpiexec -n N ...`.')
    parser.add_argument('--timeout', type=float, default=30.0, help='seconds '
                        'to wait for the other processes at each step (30)')
    parser.add_argument('--calls', type=int, default=200,
                        help='timed calls for the latency (200)')
    args = parser.parse_args(argv)  # None: sys.argv[1:]
    comm = MPI.COMM_WORLD if comm is None else comm
    started = time.monotonic()
    # Every wait, the links' too, ends after the timeout with a report.
    previous = multinode_bn.set_stall_policy(args.timeout, 'raise')
    try:
        # The first collective: a process that never started is named here.
        communication.wait(comm.Ibarrier(), comm.rank, lambda: 'multinode_bn.'
                           'check, waiting for all {} processes to start'
                           .format(comm.size))
        row = dict(describe_process(versions_override), rank=comm.rank)
        try:
            row['float32'] = run_link(comm, 'float32')
            row['float64'] = run_link(comm, 'float64')
            row['latency'] = measure_latency(comm, args.calls)
        except communication.StallError:
            raise
        except Exception as e:  # then reported by every process
            row['failure'] = 'rank {}: {!r}'.format(comm.rank, e)
        communication.wait(comm.Ibarrier(), comm.rank, lambda:
                           'multinode_bn.check, before gathering the results')
        rows = communication.allgather_objects(comm, row)
    except communication.StallError:
        # Every process that stalls says so: rank 0 may be the missing one.
        print('multinode_bn check: FAILED (rank {} waited {:.0f} s for the '
              'other processes; see the stall report above)'.format(
                  comm.rank, args.timeout), file=stream, flush=True)
        return EXIT_STALL
    finally:
        multinode_bn.set_stall_policy(previous.timeout, previous.action,
                                      previous.stream, previous.abort_after)
    lines, problems = report(rows, args.calls)
    lines.append('multinode_bn check: {} ({:.1f} s)'.format(
        'FAILED ({})'.format('; '.join(problems)) if problems else 'ok',
        time.monotonic() - started))
    if comm.rank == 0:
        print('\n'.join(lines), file=stream, flush=True)
    return 1 if problems else 0


def cli():
    """The command: exits with :func:`main`'s status, or ends the job."""
    code = main()
    if code == EXIT_STALL:
        MPI.COMM_WORLD.Abort(code)
    sys.exit(code)


if __name__ == '__main__':
    cli()
