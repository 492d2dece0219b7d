"""Forward + backward time of synchronized batch normalization on CPU.

Run from the repository root::

    mpiexec -n 2 python benchmarks/bench_bn.py            # a few minutes
    mpiexec -n 2 python benchmarks/bench_bn.py --quick    # smoke run

It times one training iteration (forward, then ``y.backward()``) of

* ``multinode_bn.MultiNodeBatchNormalization`` over ``MPI.COMM_WORLD``,
* ChainerMN's ``chainermn.links.MultiNodeBatchNormalization`` over
  ``chainermn.create_communicator('naive')``,
* Chainer's local ``chainer.links.BatchNormalization`` (no communication),

first on what real models feed batch normalization (the outputs of real
``L.Convolution2D`` layers at ResNet-50's shapes, which on the CPU are NCHW
views of NHWC memory, and of ``L.Linear``), then on C-contiguous arrays;
then a whole ResNet-50-shaped training step with its 53 batch
normalizations converted or not, and the share of the step spent in them.
It also prints the MPI collectives our link issues, evaluation mode and a
one-process communicator, the cost of one collective alone, the
memory-traffic floor and the peak temporary memory. Only rank 0 prints.
This is a measurement, not a test.

Every timed iteration starts after ``Barrier()``; the three links are
interleaved iteration by iteration, so a load change on a shared machine
hits all of them alike. An iteration's time is the slowest rank's (what a
data-parallel step waits for); the table shows the median over iterations.
"""

import argparse
import os
import sys
import time
import tracemalloc
import warnings

import numpy

import chainer
import chainer.links as L
import chainermn
from mpi4py import MPI

try:
    import multinode_bn
except ImportError:  # run from a checkout without ``pip install -e .``
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'src'))
    import multinode_bn

warnings.filterwarnings('ignore', category=FutureWarning)  # chainermn MNBN

SHAPES = [(16, 64, 32, 32), (32, 256, 14, 14), (256, 1024)]
# Batch normalization inputs of ResNet-50 (224 x 224 images), 2-4 images
# per process, as real convolutions produce them; and a Linear output.
REAL_LAYERS = [(2, 64, 56, 56), (2, 256, 56, 56), (2, 128, 28, 28),
               (2, 1024, 14, 14), (4, 2048, 7, 7), (16, 64, 32, 32),
               (256, 1024)]

COLLECTIVES = (
    'Allreduce', 'allreduce', 'Iallreduce', 'Allgather', 'allgather',
    'Iallgather', 'Allgatherv', 'Iallgatherv', 'Bcast', 'bcast', 'Ibcast',
    'Reduce', 'reduce', 'Gather', 'gather', 'Scatter', 'scatter', 'Alltoall',
    'alltoall', 'Reduce_scatter', 'Scan', 'Exscan', 'Barrier', 'barrier',
    'Ibarrier', 'Send', 'Recv', 'send', 'recv', 'Isend', 'Irecv', 'Sendrecv')


class Counting(MPI.Intracomm):
    """``Counting(MPI.COMM_WORLD)``: the same communicator, counting calls,
    also those on the duplicates a link makes of it."""

    def __new__(cls, comm=None):
        return super().__new__(cls, MPI.COMM_WORLD if comm is None else comm)

    def __init__(self, comm=None):
        super().__init__()
        self.calls = []

    def Idup(self, *args):
        self.calls.append('Idup')
        dup, request = MPI.Intracomm.Idup(self, *args)
        counting = Counting(dup)
        counting.calls = self.calls
        return counting, request


def _counted(name):
    def method(self, *args, **kwargs):
        self.calls.append(name)
        return getattr(MPI.Intracomm, name)(self, *args, **kwargs)
    method.__name__ = name
    return method


for _name in COLLECTIVES:
    if hasattr(MPI.Intracomm, _name):
        setattr(Counting, _name, _counted(_name))


def say(*args):
    if MPI.COMM_WORLD.rank == 0:
        print(*args, flush=True)


class Case(object):
    """One link with its own input variable and upstream gradient."""

    def __init__(self, name, link, x, gy):
        self.name = name
        self.link = link
        self.xv = chainer.Variable(x)
        self.gy = gy
        self.times = []

    def train_step(self):
        self.link.cleargrads()
        self.xv.cleargrad()
        y = self.link(self.xv)
        y.grad = self.gy
        y.backward()
        return y

    def eval_step(self):
        with chainer.using_config('train', False):
            return self.link(self.xv)


class FallbackCase(Case):
    """Our link with the C loops switched off (``MULTINODE_BN_CPU_KERNELS=0``):
    the NumPy code of ``multinode_bn.statistics``."""

    def train_step(self):
        previous = os.environ.get('MULTINODE_BN_CPU_KERNELS')
        os.environ['MULTINODE_BN_CPU_KERNELS'] = '0'
        try:
            return super(FallbackCase, self).train_step()
        finally:
            if previous is None:
                del os.environ['MULTINODE_BN_CPU_KERNELS']
            else:
                os.environ['MULTINODE_BN_CPU_KERNELS'] = previous


def timed(step, world):
    world.Barrier()
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def interleaved_medians(cases, step_name, iters, warmup, world):
    """Median over iterations of the slowest rank's time, per case (s)."""
    for case in cases:
        case.times = []
    for i in range(warmup + iters):
        for case in cases:
            t = timed(getattr(case, step_name), world)
            if i >= warmup:
                case.times.append(t)
    medians = []
    for case in cases:
        slowest = numpy.max(world.allgather(case.times), axis=0)
        medians.append(float(numpy.median(slowest)))
    return medians


def copy_bandwidth(world, nbytes, repeats):
    """Bytes moved per second (read + write) by ``numpy.copyto``, all ranks
    copying at once."""
    src = numpy.ones(nbytes // 4, dtype=numpy.float32)
    dst = numpy.empty_like(src)
    numpy.copyto(dst, src)
    times = []
    for _ in range(repeats):
        times.append(timed(lambda: numpy.copyto(dst, src), world))
    slowest = numpy.max(world.allgather(times), axis=0)
    return 2 * src.nbytes / float(numpy.median(slowest))


def count_collectives(make_link, x, gy, train=True):
    """Collectives issued by one forward and one backward of a link."""
    comm = Counting(MPI.COMM_WORLD)
    link = make_link(comm)
    case = Case('', link, x, gy)
    case.train_step()  # first call: parameter init, MPI op creation
    del comm.calls[:]
    link.cleargrads()
    case.xv.cleargrad()
    with chainer.using_config('train', train):
        y = link(case.xv)
    forward = list(comm.calls)
    del comm.calls[:]
    if train:
        y.grad = gy
        y.backward()
    return forward, list(comm.calls)


def peak_temporary_bytes(case):
    """tracemalloc peak of one forward + backward, above what was live."""
    case.train_step()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        y = case.train_step()
        _, peak = tracemalloc.get_traced_memory()
        del y
    finally:
        tracemalloc.stop()
    return peak - before


def collective_costs(world, channel_counts, iters):
    """Median time (slowest rank) of the collectives alone, per call.

    Our exchange (forward: the tag and ``1 + 2 C`` shifted sums;
    backward: ``2 C`` sums; both float64 with MPI's built-in ``SUM``)
    against what ChainerMN's link issues per direction (a blocking
    ``Allreduce`` of ``2 C`` float32 values).
    """
    from multinode_bn import communication
    from multinode_bn import validation
    tag = validation.exchange_tag(validation.exchange_digest('bench'))
    rows = []
    for channels in channel_counts:
        exchange = communication.create_exchange(world, 'mpi')
        exchange.width = validation.TAG_LEN + 1 + 2 * channels
        shifted = numpy.zeros(1 + 2 * channels)
        sums = numpy.zeros((2, channels))
        send = numpy.zeros(2 * channels, dtype=numpy.float32)
        recv = numpy.empty_like(send)
        steps = [lambda: exchange.allreduce_sums(shifted, tag),
                 lambda: exchange.allreduce_sums(sums, tag),
                 lambda: world.Allreduce(send, recv, op=MPI.SUM)]
        medians = []
        for step in steps:
            for _ in range(3):
                step()
            times = [timed(step, world) for _ in range(iters)]
            slowest = numpy.max(world.allgather(times), axis=0)
            medians.append(float(numpy.median(slowest)))
        rows.append((channels, medians))
    return rows


def describe(calls):
    if not calls:
        return '0'
    names = sorted(set(calls))
    return '{} ({})'.format(len(calls), ', '.join(
        '{}x{}'.format(calls.count(n), n) for n in names))


def three_links(channels, x, gy, world, mn_comm):
    """Ours, ChainerMN's and Chainer's local link on the same input."""
    return [
        Case('ours', multinode_bn.MultiNodeBatchNormalization(
            channels, world), x, gy),
        Case('ChainerMN', chainermn.links.MultiNodeBatchNormalization(
            channels, mn_comm), x, gy),
        Case('L.BN', L.BatchNormalization(channels), x, gy),
    ]


def layer_output(shape, rng):
    """A real layer's output of ``shape``: ``L.Convolution2D`` (1x1, from 16
    channels) for 4-D shapes, ``L.Linear`` for 2-D ones, float32."""
    if len(shape) == 4:
        n, c, h, w = shape
        layer = L.Convolution2D(16, c, 1, nobias=True)
        x = rng.standard_normal((n, 16, h, w)).astype(numpy.float32)
    else:
        n, c = shape
        layer = L.Linear(64, c, nobias=True)
        x = rng.standard_normal((n, 64)).astype(numpy.float32)
    with chainer.no_backprop_mode():
        return layer(x).array


def like(x, rng):
    """Random values in the memory order of ``x`` (what an element-wise
    layer's backward, such as ReLU's, hands back)."""
    out = numpy.empty_like(x)
    out[...] = rng.standard_normal(x.shape)
    return out


def layout_name(x):
    if x.flags.c_contiguous:
        return 'C-contiguous'
    if x.ndim == 4 and x.transpose(0, 2, 3, 1).flags.c_contiguous:
        return 'NCHW view of NHWC'
    return 'strided'


def ratio_table(rows):
    say('{:<18} {:<18} {:>8} {:>10} {:>8}  {:>14} {:>10}'.format(
        'shape per rank', 'memory', 'ours', 'ChainerMN', 'L.BN',
        'ours/ChainerMN', 'ours/L.BN'))
    for shape, layout, ours, mn, local in rows:
        say('{:<18} {:<18} {:>8.3f} {:>10.3f} {:>8.3f}  {:>14.2f} '
            '{:>10.2f}'.format(str(shape), layout, ours * 1e3, mn * 1e3,
                               local * 1e3, ours / mn, ours / local))
    mn_ratios = [r[2] / r[3] for r in rows]
    local_ratios = [r[2] / r[4] for r in rows]
    say('{:<37} {:>30}  {:>14.2f} {:>10.2f}'.format(
        'geometric mean', '', _geomean(mn_ratios), _geomean(local_ratios)))
    say('{:<37} {:>30}  {:>14.2f} {:>10.2f}'.format(
        'largest', '', max(mn_ratios), max(local_ratios)))


def _geomean(values):
    return float(numpy.exp(numpy.mean(numpy.log(values))))


class BatchNormTimer(chainer.FunctionHook):
    """Wall time spent in batch normalization function nodes, forward and
    backward (nested nodes, such as a backward's gradient node, counted
    once)."""

    name = 'BatchNormTimer'

    def __init__(self):
        self.total = 0.0
        self._depth = 0
        self._start = None

    def _pre(self, function):
        if 'BatchNormalization' in type(function).__name__:
            if self._depth == 0:
                self._start = time.perf_counter()
            self._depth += 1

    def _post(self, function):
        if 'BatchNormalization' in type(function).__name__:
            self._depth -= 1
            if self._depth == 0:
                self.total += time.perf_counter() - self._start

    def forward_preprocess(self, function, in_data):
        self._pre(function)

    def forward_postprocess(self, function, in_data):
        self._post(function)

    def backward_preprocess(self, function, in_data, out_grad):
        self._pre(function)

    def backward_postprocess(self, function, in_data, out_grad):
        self._post(function)


class ModelCase(object):
    """A ResNet-50-shaped model and its optimizer: one training step is
    forward, backward and update."""

    def __init__(self, name, model, x, t):
        self.name, self.model, self.x, self.t = name, model, x, t
        self.optimizer = chainer.optimizers.MomentumSGD(lr=1e-3)
        self.optimizer.setup(model)
        self.times = []

    def train_step(self):
        self.model.cleargrads()
        loss = self.model(self.x, self.t)
        loss.backward()
        self.optimizer.update()

    def batch_norm_share(self, world):
        """Share of one step (slowest rank) spent in batch normalization."""
        timer = BatchNormTimer()
        with timer:
            step = timed(self.train_step, world)
        return (max(world.allgather(timer.total)) /
                max(world.allgather(step)))


def whole_model(world, mn_comm, iters, warmup):
    """ours vs ChainerMN vs L.BN in a ResNet-50-shaped training step of 2
    images (224 x 224) per process."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from resnet50 import ResNet50
    rng = numpy.random.RandomState(world.rank)
    x = rng.standard_normal((2, 3, 224, 224)).astype(numpy.float32)
    t = rng.randint(0, 1000, 2).astype(numpy.int32)

    def model(convert):
        numpy.random.seed(0)  # the same initial weights in every model
        return convert(ResNet50())

    cases = [
        ModelCase('ours', model(lambda m: multinode_bn.create_mnbn_model(
            m, world)), x, t),
        ModelCase('ChainerMN', model(
            lambda m: chainermn.links.create_mnbn_model(m, mn_comm)), x, t),
        ModelCase('L.BN', model(lambda m: m), x, t),
    ]
    medians = interleaved_medians(cases, 'train_step', iters, warmup, world)
    shares = [case.batch_norm_share(world) for case in cases]
    return medians, shares


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help='few iterations, for a smoke run')
    parser.add_argument('--iters', type=int, default=None,
                        help='timed iterations per link (default 100, '
                        '--quick 5)')
    parser.add_argument('--model-iters', type=int, default=None,
                        help='timed ResNet-50 steps (default 5, --quick 1)')
    args = parser.parse_args()
    iters = args.iters or (5 if args.quick else 100)
    warmup = 2 if args.quick else 5

    world = MPI.COMM_WORLD
    mn_comm = chainermn.create_communicator('naive')
    size = world.size
    say('multinode_bn benchmark: {} ranks, {} CPU cores on this host, numpy {}'
        ', chainer {}; float32; median of {} iterations (slowest rank), '
        '{} warm-up; load average {:.1f}'.format(
            size, os.cpu_count(), numpy.__version__, chainer.__version__,
            iters, warmup, os.getloadavg()[0]))

    from multinode_bn import cpu_kernels
    say('statistics on float32 NumPy arrays: {}'.format(
        cpu_kernels.choose_statistics(
            numpy.zeros(1, numpy.float32), numpy.float32).name))

    bandwidth = copy_bandwidth(world, 256 << 20, 3 if args.quick else 10)
    say('copy bandwidth (numpy.copyto of 256 MiB on every rank at once, '
        'read + write): {:.1f} GB/s per rank'.format(bandwidth / 1e9))

    collective_rows = collective_costs(world, (64, 256, 1024, 2048),
                                       20 if args.quick else 200)

    real_rows = []
    for shape in REAL_LAYERS:
        rng = numpy.random.RandomState(world.rank)
        x = layer_output(shape, rng)
        gy = like(x, rng)
        channels = shape[1]
        cases = three_links(channels, x, gy, world, mn_comm)
        real_rows.append((shape, layout_name(x)) + tuple(interleaved_medians(
            cases, 'train_step', iters, warmup, world)))
    say()
    say('Real layers: BN inputs produced by L.Convolution2D (ResNet-50 '
        'shapes) and L.Linear, training step (forward + backward), ms per '
        'iteration')
    ratio_table(real_rows)

    model_iters = args.model_iters or (1 if args.quick else 5)
    (m_ours, m_mn, m_local), shares = whole_model(world, mn_comm,
                                                   model_iters, 1)
    say()
    say('Whole model: ResNet-50-shaped training step (forward, backward, '
        'MomentumSGD update; 2 images of 224 x 224 per process, 53 BN), '
        'median of {} steps, s'.format(model_iters))
    say('{:<12} {:>8} {:>10} {:>8}  {:>14} {:>10}'.format(
        '', 'ours', 'ChainerMN', 'L.BN', 'ours/ChainerMN', 'ours/L.BN'))
    say('{:<12} {:>8.3f} {:>10.3f} {:>8.3f}  {:>14.2f} {:>10.2f}'.format(
        'step', m_ours, m_mn, m_local, m_ours / m_mn, m_ours / m_local))
    say('{:<12} {:>8.2f} {:>10.2f} {:>8.2f}   (share of the step spent in '
        'batch normalization, forward + backward)'.format('BN share',
                                                          *shares))

    rows, floor_rows, memory_rows, extra_rows = [], [], [], []
    for shape in SHAPES:
        rng = numpy.random.RandomState(world.rank)
        x = rng.standard_normal(shape).astype(numpy.float32)
        gy = rng.standard_normal(shape).astype(numpy.float32)
        channels = shape[1]
        cases = three_links(channels, x, gy, world, mn_comm) + [
            FallbackCase('ours, reference',
                         multinode_bn.MultiNodeBatchNormalization(
                             channels, world), x, gy),
        ]
        ours, mn, local = interleaved_medians(
            cases[:3], 'train_step', iters, warmup, world)
        # The reference code in a run of its own beside ours: its
        # temporaries would change what the others find in the caches.
        ours_again, fallback = interleaved_medians(
            [cases[0], cases[3]], 'train_step', iters, warmup, world)
        rows.append((shape, ours, mn, local, (ours_again, fallback)))

        # Evaluation mode and a one-process communicator.
        eval_ours, eval_local = interleaved_medians(
            [cases[0], cases[2]], 'eval_step', iters, warmup, world)
        forward, backward = count_collectives(
            lambda c: multinode_bn.MultiNodeBatchNormalization(channels, c),
            x, gy)
        eval_calls, _ = count_collectives(
            lambda c: multinode_bn.MultiNodeBatchNormalization(channels, c),
            x, gy, train=False)
        self_comm = Counting(MPI.COMM_SELF)
        solo = Case('ours, COMM_SELF',
                    multinode_bn.MultiNodeBatchNormalization(
                        channels, self_comm), x, gy)
        solo_time, solo_local = interleaved_medians(
            [solo, cases[2]], 'train_step', iters, warmup, world)
        del self_comm.calls[:]
        solo.train_step()
        extra_rows.append((shape, forward, backward, eval_ours, eval_local,
                           eval_calls, solo_time, solo_local,
                           list(self_comm.calls)))

        floor = 8 * x.nbytes / bandwidth
        floor_rows.append((shape, x.nbytes, 8 * x.nbytes, floor, ours))

        memory_rows.append((shape, x.nbytes, [
            peak_temporary_bytes(case) for case in cases[:3]]))

    say()
    say('C-contiguous arrays, training step (forward + backward), ms per '
        'iteration')
    ratio_table([(shape, 'C-contiguous', ours, mn, local)
                 for shape, ours, mn, local, _ in rows])

    say()
    say('What the C loops bring: our link with MULTINODE_BN_CPU_KERNELS=0 '
        '(the plain reference code), interleaved with ours in a run of '
        'their own, ms')
    say('{:<18} {:>8} {:>12} {:>14} {:>16}'.format(
        'shape per rank', 'ours', 'reference', 'loops/ref.',
        'ref./ChainerMN'))
    for shape, _, mn, local, (ours, fallback) in rows:
        say('{:<18} {:>8.3f} {:>12.3f} {:>14.2f} {:>16.2f}'.format(
            str(shape), ours * 1e3, fallback * 1e3, ours / fallback,
            fallback / mn))

    say()
    say('Collectives of our link (Counting(MPI.COMM_WORLD)); evaluation mode'
        ' (forward only) and a one-process communicator (Counting(MPI.'
        'COMM_SELF), training step), ms')
    header = ('{:<18} {:>16} {:>16} | {:>8} {:>8} {:>6} | {:>9} {:>8} {:>6}')
    say(header.format('shape per rank', 'train forward', 'train backward',
                      'eval ours', 'eval L.BN', 'calls', 'size-1 ours',
                      'L.BN', 'calls'))
    for (shape, forward, backward, eval_ours, eval_local, eval_calls,
         solo_time, solo_local, solo_calls) in extra_rows:
        say('{:<18} {:>16} {:>16} | {:>9.3f} {:>9.3f} {:>6} | {:>11.3f} '
            '{:>8.3f} {:>6}'.format(
                str(shape), describe(forward), describe(backward),
                eval_ours * 1e3, eval_local * 1e3, describe(eval_calls),
                solo_time * 1e3, solo_local * 1e3, describe(solo_calls)))

    if collective_rows:
        say()
        say('One collective alone, us per call (median, slowest rank): ours '
            'forward and backward (one Iallreduce, built-in SUM, of the '
            '12-value tag and 1 + 2 C float64; the backward\'s '
            '2 C sums padded to that size), and ChainerMN\'s per-direction '
            'blocking Allreduce of 2 C float32')
        say('{:>8} {:>14} {:>14} {:>16}'.format('C', 'ours forward',
                                                'ours backward',
                                                'ChainerMN-style'))
        for channels, medians in collective_rows:
            say('{:>8} {:>14.1f} {:>14.1f} {:>16.1f}'.format(
                channels, *[m * 1e6 for m in medians]))

    say()
    say('Memory-traffic floor of a training step: forward reads x for the '
        'statistics, reads x and writes y for the output (3 |x|); backward '
        'reads gy and x for the reductions, reads gy and x and writes gx for '
        'the input gradient (5 |x|): floor = 8 |x| / copy bandwidth '
        '({:.1f} GB/s). The bandwidth is that of DRAM; a ratio below 1 means '
        'part of the traffic was served from the caches.'.format(
            bandwidth / 1e9))
    say('{:<18} {:>8} {:>10} {:>10} {:>10} {:>11}'.format(
        'shape per rank', '|x| MiB', '8|x| MiB', 'floor ms', 'ours ms',
        'ours/floor'))
    for shape, nbytes, moved, floor, ours in floor_rows:
        say('{:<18} {:>8.2f} {:>10.2f} {:>10.3f} {:>10.3f} {:>11.2f}'.format(
            str(shape), nbytes / 2.0 ** 20, moved / 2.0 ** 20, floor * 1e3,
            ours * 1e3, ours / floor))

    say()
    say('Peak temporary memory of one training step (tracemalloc peak above '
        'what was live before; includes the outputs y and gx), MiB and '
        'multiples of |x|')
    say('{:<18} {:>16} {:>16} {:>16}'.format('shape per rank', 'ours',
                                             'ChainerMN', 'L.BN'))
    for shape, nbytes, peaks in memory_rows:
        say('{:<18} {:>16} {:>16} {:>16}'.format(str(shape), *[
            '{:.2f} ({:.1f}x)'.format(p / 2.0 ** 20, p / float(nbytes))
            for p in peaks]))
    say()
    say('load average at the end: {:.1f} on {} cores (the {} ranks alone '
        'make about {}; more means other processes shared the cores and '
        'inflated the times above)'.format(os.getloadavg()[0],
                                           os.cpu_count(), size, size))


if __name__ == '__main__':
    main()
