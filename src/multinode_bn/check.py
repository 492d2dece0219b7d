"""The self-check of an MPI job (docs/usage.md, "Checking a cluster")."""

import argparse
import contextlib
import platform
import sys
import time
import timeit

import chainer
import chainer.links as L
import mpi4py
from mpi4py import MPI
import numpy

import multinode_bn
from multinode_bn import communication
from multinode_bn import cpu_kernels
from multinode_bn import validation

#: Errors allowed against the float64 reference, relative to its largest.
TOLERANCE = {'float32': 1e-5, 'float64': 1e-12}
EXIT_STALL = 2  # a process did not join in time
#: The table's headings by column key; all but MAY_DIFFER must agree.
COLUMNS = dict(rank='rank', host='host', python='Python', numpy='NumPy',
               chainer='Chainer', mpi4py='mpi4py', multinode_bn='multinode_bn',
               mpi='MPI library', c_loops='C loops', cupy='CuPy', nccl='NCCL',
               devices='devices')
MAY_DIFFER = ('rank', 'host', 'devices')
BATCH_SIZES = (1, 2, 3)  # the local batch of rank r: BATCH_SIZES[r % 3]
CHANNELS, SPATIAL = 8, (5, 7)
GAMMA = numpy.linspace(0.5, 1.5, CHANNELS)
BETA = numpy.linspace(-1.0, 1.0, CHANNELS)
SETTINGS = dict(decay=0.9, eps=2e-5, initial_gamma=GAMMA, initial_beta=BETA)
WIDTH = validation.TAG_LEN + 1 + 2 * CHANNELS  # of the link's exchange
LATENCIES = ('link forward (training), C={}'.format(CHANNELS),
             'its exchange alone ({} float64, Iallreduce)'.format(WIDTH),
             'plain Allreduce of {} float64'.format(WIDTH))


def describe_process():
    """This process's row of the table, by column key."""
    # "MPICH Version: 4.2.1 ..." or "Open MPI v4.1.5, package: ...".
    library = MPI.Get_library_version().strip().splitlines()[0].split(',')[0]
    info = {'host': MPI.Get_processor_name(),
            'mpi': ' '.join(library.replace('Version:', '').split()),
            'python': platform.python_version(), 'numpy': numpy.__version__,
            'chainer': chainer.__version__, 'mpi4py': mpi4py.__version__,
            'multinode_bn': multinode_bn.__version__,
            'c_loops': 'yes' if cpu_kernels.available() else 'no',
            'cupy': '-', 'nccl': '-', 'devices': '-'}
    with contextlib.suppress(Exception):  # no CuPy, or CuPy without NCCL
        import cupy
        info['cupy'] = cupy.__version__
        try:
            runtime = cupy.cuda.runtime
            name = runtime.getDeviceProperties(0)['name'].decode()
            info['devices'] = '{} x {}'.format(runtime.getDeviceCount(), name)
        except Exception as e:  # no device, or no driver
            info['devices'] = 'none ({})'.format(type(e).__name__)
        from cupy.cuda import nccl
        v = nccl.get_version()
        info['nccl'] = '{}.{}.{}'.format(v // 10000, v // 100 % 100, v % 100)
    return info


def format_table(rows):
    """The table's lines, each value that differs from rank 0's marked
    ``*`` and listed below it, and the problems."""
    table, listed, problems = [list(COLUMNS.values())], [], set()
    for row in rows:
        table.append([str(row[key]) for key in COLUMNS])
        for i, (key, heading) in enumerate(COLUMNS.items()):
            if key not in MAY_DIFFER and row[key] != rows[0][key]:
                table[-1][i] += '*'
                problems.add(heading + ' differs')
                listed.append('  * rank {} has {} {} (rank 0: {})'.format(
                    row['rank'], heading, row[key], rows[0][key]))
    widths = [max(map(len, column)) for column in zip(*table)]
    return ['  ' + '  '.join(c.ljust(w) for c, w in zip(cells, widths))
            .rstrip() for cells in table] + listed, sorted(problems)


def local_batch(rank, dtype):
    """The input and output gradient of process ``rank``."""
    rng = numpy.random.RandomState(1000 + rank)
    shape = (BATCH_SIZES[rank % 3], CHANNELS) + SPATIAL
    return ((3 + 2 * rng.standard_normal(shape)).astype(dtype),
            rng.standard_normal(shape).astype(dtype))


def run_link(link, x, gy):
    """One training step of ``link`` on ``x``: its results by name."""
    x = chainer.Variable(x)
    y = link(x)
    gx, ggamma, gbeta = chainer.grad([y], [x, link.gamma, link.beta], [gy])
    return dict(y=y.array, gx=gx.array, ggamma=ggamma.array, gbeta=gbeta.array,
                avg_mean=link.avg_mean, avg_var=link.avg_var)


def gather_rows(comm, versions_override, calls):
    """Every process's row: what it runs, and its results or its failure."""
    row = dict(describe_process(), **(versions_override or {}), rank=comm.rank)
    # The first collective: a process that never started is named here.
    communication.wait(comm.Ibarrier(), comm.rank, lambda: 'multinode_bn.'
                       'check, waiting for all {} processes to start'
                       .format(comm.size))
    try:
        for dtype in TOLERANCE:
            x, gy = local_batch(comm.rank, dtype)
            link = multinode_bn.MultiNodeBatchNormalization(
                CHANNELS, comm, dtype=dtype, **SETTINGS)
            link.label = 'multinode_bn.check ({})'.format(dtype)
            row[dtype] = dict(run_link(link, x, gy), x=x, gy=gy)
        row['latency'] = measure_latency(comm, calls)
    except communication.StallError:
        raise
    except Exception as e:  # then reported by every process
        row['failure'] = 'rank {}: {!r}'.format(comm.rank, e)
    communication.wait(comm.Ibarrier(), comm.rank, lambda:
                       'multinode_bn.check, before gathering the results')
    return communication.allgather_objects(comm, row)


def measure_latency(comm, calls):
    """Median seconds of each of :data:`LATENCIES` (docs/usage.md)."""
    link = multinode_bn.MultiNodeBatchNormalization(CHANNELS, comm)
    link.label = 'multinode_bn.check (latency)'
    x = numpy.arange(4 * CHANNELS, dtype=numpy.float32).reshape(4, CHANNELS)
    exchange = communication.create_exchange(comm, 'mpi')
    exchange.width = WIDTH
    tag, sums = numpy.zeros(validation.TAG_LEN), numpy.zeros(1 + 2 * CHANNELS)
    send, receive = numpy.zeros(WIDTH), numpy.empty(WIDTH)
    timers = [timeit.Timer(step) for step in (
        lambda: link(x), lambda: exchange.allreduce_sums(sums, tag),
        lambda: comm.Allreduce(send, receive))]
    with chainer.no_backprop_mode():  # in turn: alike for the three
        times = [[t.timeit(1) for t in timers] for _ in range(calls)]
    return numpy.median(times, 0)


def compare(runs):
    """Our link's results on every process against Chainer's float64 BN on
    the gathered batch: the largest relative error, where, and whether the
    running statistics are the same bits on every process."""
    got = dict(runs[0])  # rank 0's running statistics
    for name in ('x', 'gy', 'y', 'gx'):
        got[name] = numpy.concatenate([run[name] for run in runs], dtype='f8')
    for name in ('ggamma', 'gbeta'):  # summed over processes
        got[name] = sum(run[name].astype(numpy.float64) for run in runs)
    reference = L.BatchNormalization(CHANNELS, dtype=numpy.float64, **SETTINGS)
    ref = run_link(reference, got.pop('x'), got.pop('gy'))
    errors = {name: numpy.nan_to_num(abs(got[name] - ref[name]).max(),
                                     nan=numpy.inf)
              / max(abs(ref[name]).max(), 1e-300) for name in ref}
    worst = max(errors, key=errors.get)
    same = all(run[name].tobytes() == runs[0][name].tobytes()
               for run in runs for name in ('avg_mean', 'avg_var'))
    return errors[worst], worst, same


def report(rows, calls):
    """The report's lines but the verdict, and the problems found."""
    table, problems = format_table(rows)
    hosts = len({row['host'] for row in rows})
    sizes = ', '.join(str(BATCH_SIZES[r % 3]) for r in range(len(rows)))
    lines = ['multinode_bn check: {} process{} on {} host{}'.format(
        len(rows), 'es' if len(rows) > 1 else '', hosts,
        's' if hosts > 1 else '')] + table
    lines += ['', 'synchronized BN forward + backward on local batches of {} '
              "(C={}, {}x{}) against Chainer's float64 BN on the gathered "
              'batch:'.format(sizes, CHANNELS, *SPATIAL)]
    failures = [row['failure'] for row in rows if 'failure' in row]
    if failures:
        return (lines + ['  FAILED: ' + '; '.join(failures), ''],
                problems + ['the link raised'])
    for dtype, tolerance in TOLERANCE.items():
        error, worst, same = compare([row[dtype] for row in rows])
        lines.append('  {}  max error {:.1e}{} (tolerance {:.0e}, worst: {})'
                     '  statistics bit-identical: {}'.format(
                         dtype, error, ' TOO LARGE' if error > tolerance
                         else '', tolerance, worst, 'yes' if same else 'NO'))
        if error > tolerance:
            problems.append(dtype + ' error above tolerance')
        if not same:
            problems.append(dtype + ' running statistics differ')
    slowest = numpy.max([row['latency'] for row in rows], 0)
    lines += ['', 'median of {} calls, slowest process:'.format(calls)] + [
        '  {:<46} {:>6.0f} us'.format(what, 1e6 * seconds)
        for what, seconds in zip(LATENCIES, slowest)]
    if len(rows) == 1:
        lines.append('  (1 process: nothing is exchanged; use mpiexec -n N)')
    return lines + [''], problems


def main(argv=None, comm=None, versions_override=None, stream=None):
    """Runs the check on every process of ``comm``; returns the exit status.

    Args:
        argv (list of str): The options (default ``sys.argv[1:]``).
        comm: ``mpi4py.MPI.Comm`` (default ``MPI.COMM_WORLD``).
        versions_override (dict): This process's table values to replace,
            by column key (to simulate a mixed installation).
        stream: Where rank 0 writes the report (default ``sys.stdout``).
    """
    parser = argparse.ArgumentParser(
        prog='python -m multinode_bn.check', description='Checks an MPI job '
        'before a long run; run it as the job: `mpiexec -n N ...`.')
    parser.add_argument('--timeout', type=float, default=30.0, help='seconds '
                        'to wait for the other processes at each step (30)')
    parser.add_argument('--calls', type=int, default=200,
                        help='timed calls for the latency (200)')
    args = parser.parse_args(argv)
    comm = comm or MPI.COMM_WORLD
    started = timeit.default_timer()
    # Every wait, the links' too, ends after the timeout with a report.
    previous = multinode_bn.set_stall_policy(args.timeout, 'raise')
    try:
        rows = gather_rows(comm, versions_override, args.calls)
    except communication.StallError:
        # Every process that stalls says so: rank 0 may be the missing one.
        print('multinode_bn check: FAILED (rank {} waited {:.0f} s)'.format(
            comm.rank, args.timeout), file=stream, flush=True)
        return EXIT_STALL
    finally:
        multinode_bn.set_stall_policy(*previous)
    lines, problems = report(rows, args.calls)
    lines.append('multinode_bn check: {} ({:.1f} s)'.format(
        'FAILED ({})'.format('; '.join(problems)) if problems else 'ok',
        timeit.default_timer() - started))
    if comm.rank == 0:
        print('\n'.join(lines), file=stream, flush=True)
    return 1 if problems else 0


def cli():
    """The command: exits with :func:`main`'s status, or ends the job."""
    code = main()
    if code == EXIT_STALL:
        # The abort kills mpiexec's output forwarding: let it pass the report.
        time.sleep(1.0)
        MPI.COMM_WORLD.Abort(code)
    sys.exit(code)


if __name__ == '__main__':
    cli()
