"""Training patterns of real models (gradient penalties, copies,
recomputation, previews, resume, GANs, ...): each script runs on our model
(this process's rows of every batch) and on the same model with
``L.BatchNormalization`` in one process on the concatenated batches, in
float64 unless the pattern is about another dtype. Compared: per-process
outputs and input gradients (the process's rows of the reference's), running
statistics, and parameter gradients summed over processes. Last, a
segmentation network with pyramid pooling, converted by
``create_mnbn_model``, against the same network in one process."""

import copy

import numpy
import pytest

import chainer
import chainer.functions as F
import chainer.links as L
from mpi4py import MPI

import multinode_bn
from conftest import assert_close, on_every_rank

everywhere = pytest.mark.parallel(nprocs=[1, 2, 3])
parallel = pytest.mark.parallel(nprocs=[2, 3])

SIZES = (3, 2, 4)      # local batch sizes of ranks 0, 1, 2
TAIL = (3, 4, 4)       # sample shape of the conv networks
# atol is relative to the largest expected magnitude of each array. float32
# and float16 against float64: a few times the error of Chainer's own link in
# that dtype on these data.
EXACT = dict(rtol=1e-9, atol=1e-11)
FLOAT32 = dict(rtol=1e-4, atol=1e-5)
FLOAT16 = dict(rtol=3e-2, atol=1e-2)
LR = 0.1

# Kinds of compared values.
ROWS = 'rows'          # per sample: ours are the process's rows
SUMMED = 'summed'      # summed over processes
SHARED = 'shared'      # the same on every process


def agreed(step):
    """``step()``'s result; raises on every process if it raised on any."""
    with on_every_rank():
        return step()


def close(what, actual, expected, tol):
    """``actual`` against ``expected``, with ``tol['atol']`` relative to the
    largest expected magnitude."""
    expected = numpy.asarray(expected, numpy.float64)
    scale = max(1.0, numpy.abs(expected).max(initial=0.0))
    assert_close(actual, expected, tol['rtol'], tol['atol'] * scale, what)


def draw(seed, tail=TAIL, sizes=None, loc=1.0):
    """A global float64 batch, the same on every process."""
    total = sum(sizes or SIZES[:MPI.COMM_WORLD.size])
    return loc + numpy.random.RandomState(seed).standard_normal(
        (total,) + tuple(tail))


def weights(seed, sizes=None):
    """Loss weights for the output of :func:`conv_net`."""
    return draw(seed, (2, 4, 4), sizes, loc=0.0)


class Side(object):
    """One side of a comparison: our synchronized model on ``comm`` (the
    process's rows of each batch, in ``x_dtype``), or the reference
    (``comm=None``: whole batches, float64, ``L.BatchNormalization``)."""

    def __init__(self, comm=None, sizes=None, x_dtype=numpy.float64,
                 bn_dtype=numpy.float64):
        self.comm, self.ours = comm, comm is not None
        self.sizes = list(sizes or SIZES[:MPI.COMM_WORLD.size])
        self.x_dtype, self.bn_dtype = x_dtype, bn_dtype
        self.rank0 = not self.ours or comm.rank == 0
        self.name = 'ours{}'.format(comm.rank) if self.ours else 'reference'

    def rows(self, a):
        if not self.ours:
            return a
        start = sum(self.sizes[:self.comm.rank])
        return a[start:start + self.sizes[self.comm.rank]]

    def view(self, a):
        """This side's rows of a global batch, in its input dtype (the
        reference sees the very values ours see, in float64)."""
        a = self.rows(a.astype(self.x_dtype))
        return a.copy() if self.ours else a.astype(numpy.float64)

    def bn(self, size, **kwargs):
        if self.ours:
            return multinode_bn.MultiNodeBatchNormalization(
                size, self.comm, dtype=self.bn_dtype, **kwargs)
        return L.BatchNormalization(size, dtype=numpy.float64, **kwargs)

    def sum(self, a):
        if not self.ours:
            return a
        out = numpy.empty_like(a)
        self.comm.Allreduce(numpy.ascontiguousarray(a), out, op=MPI.SUM)
        return out


def seeded(model, seed=7):
    """The same parameters wherever the model is built."""
    rng = numpy.random.RandomState(seed)
    for name, param in sorted(model.namedparams()):
        low = 0.5 if name.endswith('gamma') else -0.6
        param.array[...] = rng.uniform(low, low + 1.1, param.shape)
    return model


def conv_net(side):
    """conv -> BN -> relu -> conv -> BN."""
    with chainer.using_config('dtype', numpy.float64):
        return seeded(chainer.Sequential(
            L.Convolution2D(3, 4, 3, pad=1), side.bn(4), F.relu,
            L.Convolution2D(4, 2, 1), side.bn(2)))


def state_of(model, prefix='', params=False, grads=True):
    """Gradients of every parameter (summed over processes), the running
    statistics of every BN and, with ``params``, the parameters."""
    out = {}
    for name, param in model.namedparams():
        if grads:
            grad = None if param.grad is None else param.grad.copy()
            out['{}{} grad'.format(prefix, name)] = (SUMMED, grad)
        if params:
            out[prefix + name] = (SHARED, param.array.copy())
    for name, link in model.namedlinks():
        if isinstance(link, L.BatchNormalization):
            for stat in ('avg_mean', 'avg_var'):
                out['{}{} {}'.format(prefix, name, stat)] = (
                    SHARED, getattr(link, stat).copy())
    return out


def call(model, side, x, w):
    """``(x, y, sum(w * y))``, ``y = model(x)`` on this side's rows."""
    xv = chainer.Variable(side.view(x))
    y = model(xv)
    return xv, y, F.sum(y * side.view(w))


def train(model, side, x, w, prefix='', params=False):
    """One forward and backward of ``sum(w * model(x))``."""
    xv, y, loss = call(model, side, x, w)
    model.cleargrads()
    loss.backward()
    out = state_of(model, prefix, params)
    out[prefix + 'output'], out[prefix + 'x.grad'] = (ROWS, y.array), (
        ROWS, xv.grad)
    return out


def sgd(model, side):
    """A data-parallel step: parameters less ``LR`` times the global
    gradient (ours: summed over processes)."""
    for _, param in sorted(model.namedparams()):
        param.array -= LR * side.sum(param.grad)


def check(ours, ref, tol, side):
    """Our results (``side``) against the reference's; collective."""
    with on_every_rank() as ranks:
        for name in sorted(ref):
            kind, expected = ref[name]
            actual = ours.get(name, (kind, None))[1]
            if kind == SUMMED:
                if expected is None:
                    continue
                mine = numpy.full(numpy.shape(expected), numpy.nan) \
                    if actual is None else numpy.asarray(actual,
                                                         numpy.float64)
                ranks.check(close, name + ' summed over processes',
                            MPI.COMM_WORLD.allreduce(mine), expected, tol)
            elif kind == ROWS:
                if actual is not None:  # rows this process computed
                    ranks.check(close, name, actual, side.rows(expected),
                                tol)
            else:
                ranks.check(close, name, actual, expected, tol)
        # (last: the loop above makes collectives)
        assert sorted(ours) == sorted(ref), (
            'compared values differ: {} against {}'.format(sorted(ours),
                                                           sorted(ref)))


def compare(script, tol=EXACT, comm=None, **kwargs):
    """Runs ``script(side)`` on our side and on the reference, and compares
    what it returns."""
    side = Side(comm or MPI.COMM_WORLD, **kwargs)
    ours = agreed(lambda: script(side))
    ref = script(Side(None, **kwargs))
    check(ours, ref, tol, side)


# --- Second order: penalties whose upstream gradient depends on the output


@everywhere
@pytest.mark.parametrize('layout', ['NCHW', 'NHWC'])
@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_double_backward_of_output_dependent_loss_matches_global_bn(
        dtype, layout):
    dtype = numpy.dtype(dtype)
    tail, axis, channels = ((3, 4, 4), None, 3) if layout == 'NCHW' else (
        (4, 4, 3), (0, 1, 2), 3)
    x = draw(1, tail)
    c = numpy.random.RandomState(2).uniform(0.5, 1.5, x.shape)

    def script(side):
        link = seeded(side.bn(channels, axis=axis))
        xv = chainer.Variable(side.view(x))
        y = link(xv)
        # Weights c: beta.grad would be zero for sum(y ** 3).
        g, = chainer.grad([F.sum(side.view(c) * y ** 3)], [xv],
                          enable_double_backprop=True)
        penalty = F.sum(g ** 2)
        link.cleargrads()
        penalty.backward()
        return dict(state_of(link), **{
            'output': (ROWS, y.array), 'first-order gx': (ROWS, g.array),
            'x.grad': (ROWS, xv.grad), 'penalty': (SUMMED, penalty.array)})
    compare(script, EXACT if dtype == numpy.float64 else FLOAT32,
            x_dtype=dtype, bn_dtype=dtype)


def penalty_numpy(x, gamma, beta, eps, c):
    """``sum(g ** 2)``, ``g`` the gradient of ``sum(c * bn(x) ** 3)`` w.r.t.
    x, in closed form (float64 NumPy, NCHW)."""
    axis, shape = (0, 2, 3), (1, -1, 1, 1)
    mean = x.mean(axis=axis, keepdims=True)
    inv_std = 1 / numpy.sqrt(x.var(axis=axis, keepdims=True) + eps)
    x_hat = (x - mean) * inv_std
    gy = 3 * c * (gamma.reshape(shape) * x_hat + beta.reshape(shape)) ** 2
    g = gamma.reshape(shape) * inv_std * (
        gy - gy.mean(axis=axis, keepdims=True)
        - x_hat * (gy * x_hat).mean(axis=axis, keepdims=True))
    return (g ** 2).sum()


def test_double_backward_matches_central_finite_differences_on_one_process():
    x = draw(2, (3, 2, 2), sizes=[4])
    c = numpy.random.RandomState(3).uniform(0.5, 1.5, x.shape)
    link = seeded(multinode_bn.MultiNodeBatchNormalization(
        3, MPI.COMM_WORLD, dtype=numpy.float64))
    gamma, beta = link.gamma.array.copy(), link.beta.array.copy()
    xv = chainer.Variable(x.copy())
    g, = chainer.grad([F.sum(c * link(xv) ** 3)], [xv],
                      enable_double_backprop=True)
    penalty = F.sum(g ** 2)
    link.cleargrads()
    penalty.backward()

    def central(f, a, h=1e-5):
        grad = numpy.zeros_like(a)
        for i in numpy.ndindex(*a.shape):
            keep = a[i]
            a[i] = keep + h
            up = f()
            a[i] = keep - h
            grad[i] = (up - f()) / (2 * h)
            a[i] = keep
        return grad

    def loss():
        return penalty_numpy(x, gamma, beta, link.eps, c)

    tol = dict(rtol=1e-6, atol=1e-6)
    with on_every_rank() as ranks:
        ranks.check(close, 'penalty', penalty.array, loss(), EXACT)
        ranks.check(close, 'gamma.grad', link.gamma.grad,
                    central(loss, gamma), tol)
        ranks.check(close, 'beta.grad', link.beta.grad, central(loss, beta),
                    tol)
        ranks.check(close, 'x.grad', xv.grad, central(loss, x), tol)


@everywhere
def test_gradient_penalty_through_conv_bn_network_matches_global_bn():
    # WGAN-GP: the penalty of the critic's input gradient norm per sample.
    x = draw(3)
    w = numpy.random.RandomState(4).standard_normal((1, 2, 4, 4))

    def script(side):
        critic = conv_net(side)
        xv = chainer.Variable(side.view(x))
        scores = F.sum(critic(xv) * w, axis=(1, 2, 3))
        g, = chainer.grad([F.sum(scores)], [xv], enable_double_backprop=True)
        norms = F.sqrt(F.sum(g ** 2, axis=(1, 2, 3)))
        penalty = F.sum((norms - 1) ** 2)
        critic.cleargrads()
        penalty.backward()
        return dict(state_of(critic), **{
            'input gradient norms': (ROWS, norms.array),
            'x.grad': (ROWS, xv.grad), 'penalty': (SUMMED, penalty.array)})
    compare(script)


# --- Identities


@parallel
def test_model_built_on_one_process_only_leaves_training_exact():
    # A preview model made on rank 0 before the trained one, evaluated on
    # rank 0 only, never trained. On a communicator of its own, so that the
    # link numbering of the other tests is not shifted.
    comm = MPI.COMM_WORLD.Dup()
    x1, x2, x3, w = draw(5), draw(6), draw(7), weights(8)

    def script(side):
        preview = conv_net(side) if side.ours and side.rank0 else None
        model = conv_net(side)
        out = train(model, side, x1, w, 'step 1 ')
        if preview is not None:
            with chainer.using_config('train', False):
                preview(side.view(x3))
        out.update(train(model, side, x2, w, 'step 2 '))
        return out
    compare(script, comm=comm)


# --- Copies


def duplicate(link, how):
    if how == 'deepcopy':
        return copy.deepcopy(link)
    if how == 'revert':
        return multinode_bn.revert_mnbn_model(link)
    return link.copy(how)


@everywhere
@pytest.mark.parametrize('how', ['deepcopy', 'copy', 'init', 'revert'])
@pytest.mark.parametrize('backend', ['float16', 'mixed16', 'plain'])
def test_link_copied_after_its_first_call_trains_like_the_original(
        backend, how, monkeypatch):
    if backend == 'plain':
        monkeypatch.setenv('MULTINODE_BN_CPU_KERNELS', '0')
        dtypes, tol = (numpy.float64, numpy.float64), EXACT
    else:
        dtypes = (numpy.float16, {'float16': numpy.float16,
                                  'mixed16': chainer.mixed16}[backend])
        tol = FLOAT16
    x1, x2, w = (draw(seed, (3, 2, 2), loc=loc)
                 for seed, loc in ((9, 1.0), (10, 1.0), (11, 0.0)))

    def script(side):
        original = seeded(side.bn(3))
        train(original, side, x1, w)
        twin = agreed(lambda: duplicate(original, how))
        if how == 'revert':
            with chainer.using_config('train', False):
                out = {'reverted eval output': (
                    ROWS, twin(side.view(x2)).array)}
            out.update(state_of(twin, 'reverted', params=True, grads=False))
        else:
            out = train(twin, side, x2, w, 'copy ', params=True)
        out.update(train(original, side, x2, w, 'original ', params=True))
        return out
    compare(script, tol, x_dtype=dtypes[0], bn_dtype=dtypes[1])


# --- Patterns that work: keep them exact


@everywhere
def test_siamese_calls_of_one_link_match_global_bn():
    xa, xb, wa, wb = draw(13), draw(14), weights(15), weights(16)

    def script(side):
        model = conv_net(side)
        (va, _, la), (vb, _, lb) = (call(model, side, xa, wa),
                                    call(model, side, xb, wb))
        model.cleargrads()
        (la + lb).backward()
        return dict(state_of(model), **{'xa.grad': (ROWS, va.grad),
                                        'xb.grad': (ROWS, vb.grad)})
    compare(script)


@everywhere
def test_train_mode_forward_without_backprop_matches_global_bn():
    x0, x1, w = draw(17), draw(18), weights(19)

    def script(side):
        model = conv_net(side)
        with chainer.no_backprop_mode():
            y0 = model(side.view(x0))
        out = train(model, side, x1, w)
        out['no-backprop output'] = (ROWS, y0.array)
        return out
    compare(script)


@everywhere
def test_forget_recomputation_matches_global_bn():
    x, w = draw(20), weights(21)

    def script(side):
        model = conv_net(side)
        xv = chainer.Variable(side.view(x))
        y = F.forget(model, xv)
        model.cleargrads()
        F.sum(y * side.view(w)).backward()
        return dict(state_of(model), **{'output': (ROWS, y.array),
                                        'x.grad': (ROWS, xv.grad)})
    compare(script)


@everywhere
def test_gradient_accumulated_over_two_batches_matches_global_bn():
    batches = [(draw(22), weights(23)), (draw(24), weights(25))]

    def script(side):
        model = conv_net(side)
        model.cleargrads()
        out = {}
        for i, (x, w) in enumerate(batches):
            xv, _, loss = call(model, side, x, w)
            loss.backward()
            out['x{}.grad'.format(i)] = (ROWS, xv.grad)
        out.update(state_of(model))
        return out
    compare(script)


@everywhere
def test_deepcopy_of_trained_model_trained_beside_it_matches_global_bn():
    # A teacher copy: both models called on the same batch, one backward.
    x1, x2, w1, w2 = draw(26), draw(27), weights(28), weights(29)

    def script(side):
        student = conv_net(side)
        out = train(student, side, x1, w1, 'step 1 ')
        sgd(student, side)
        teacher = agreed(lambda: copy.deepcopy(student))
        xv = chainer.Variable(side.view(x2))
        loss = F.sum(student(xv) * side.view(w1)) + F.sum(
            teacher(xv) * side.view(w2))
        student.cleargrads()
        teacher.cleargrads()
        loss.backward()
        out.update(state_of(student, 'student '))
        out.update(state_of(teacher, 'teacher '))
        out['step 2 x.grad'] = (ROWS, xv.grad)
        return out
    compare(script)


@everywhere
def test_dropped_output_matches_global_bn():
    x0, x1, w = draw(30), draw(31), weights(32)

    def script(side):
        model = conv_net(side)
        model(side.view(x0))  # a call whose output is never used
        return train(model, side, x1, w)
    compare(script)


@everywhere
def test_evaluation_on_rank_zero_only_between_steps_matches_global_bn():
    x1, x2, xe, w = draw(33), draw(34), draw(35), weights(36)

    def script(side):
        model = conv_net(side)
        out = train(model, side, x1, w, 'step 1 ')
        sgd(model, side)
        evaluation = None
        if side.rank0:
            with chainer.using_config('train', False):
                evaluation = model(side.view(xe)).array
        out['rank 0 evaluation'] = (ROWS, evaluation)
        out.update(train(model, side, x2, w, 'step 2 '))
        return out
    compare(script)


@everywhere
def test_resume_from_save_npz_matches_global_bn(tmp_path):
    x1, x2, w = draw(37), draw(38), weights(39)

    def script(side):
        model = conv_net(side)
        out = train(model, side, x1, w, 'step 1 ')
        sgd(model, side)
        path = str(tmp_path / '{}.npz'.format(side.name))
        chainer.serializers.save_npz(path, model)
        resumed = conv_net(side)
        chainer.serializers.load_npz(path, resumed)
        out.update(train(resumed, side, x2, w, 'step 2 '))
        out.update(state_of(resumed, 'resumed ', params=True))
        return out
    compare(script)


@parallel
def test_checkpoint_saved_on_fewer_processes_resumes_like_global_bn(
        tmp_path):
    # Saved by a job of size - 1 processes (a sub-communicator), loaded by
    # all of them.
    comm = MPI.COMM_WORLD
    before, after = list(SIZES[:comm.size - 1]), list(SIZES[:comm.size])
    x1, w1 = draw(40, sizes=before), weights(41, before)
    x2, w2 = draw(42, sizes=after), weights(43, after)
    path = comm.bcast(str(tmp_path / 'checkpoint.npz'), root=0)
    saving = comm.rank < comm.size - 1
    sub = comm.Split(0 if saving else 1, comm.rank)

    def resume(side, saved):
        model = conv_net(side)
        chainer.serializers.load_npz(saved, model)
        return dict(train(model, side, x2, w2),
                    **state_of(model, 'after ', params=True))

    def save():
        if saving:
            side = Side(sub, before)
            model = conv_net(side)
            train(model, side, x1, w1)
            sgd(model, side)
            if sub.rank == 0:
                chainer.serializers.save_npz(path, model)
    try:
        agreed(save)
        ours = agreed(lambda: resume(Side(comm, after), path))
    finally:
        sub.Free()
    ref = Side(None)
    model = conv_net(ref)
    train(model, ref, x1, w1)
    sgd(model, ref)
    chainer.serializers.save_npz(str(tmp_path / 'ref.npz'), model)
    check(ours, resume(ref, str(tmp_path / 'ref.npz')), EXACT,
          Side(comm, after))


@everywhere
def test_gan_step_matches_global_bn():
    z1, z2, real = draw(44, (4,), loc=0), draw(45, (4,), loc=0), draw(
        46, (8,))

    def script(side):
        with chainer.using_config('dtype', numpy.float64):
            gen = seeded(chainer.Sequential(
                L.Linear(4, 6), side.bn(6), F.relu, L.Linear(6, 8)), 1)
            dis = seeded(chainer.Sequential(
                L.Linear(8, 5), side.bn(5), F.leaky_relu, L.Linear(5, 1)), 2)
        fake = gen(side.view(z1))
        d_loss = F.sum(F.softplus(-dis(side.view(real)))) + F.sum(
            F.softplus(dis(fake.array)))
        dis.cleargrads()
        d_loss.backward()
        out = state_of(dis, 'D step: D')
        sgd(dis, side)
        g_loss = F.sum(F.softplus(-dis(gen(side.view(z2)))))
        gen.cleargrads()
        dis.cleargrads()
        g_loss.backward()
        out.update(state_of(gen, 'G step: G'))
        sgd(gen, side)
        out.update(state_of(gen, 'after: G', params=True))
        out.update(state_of(dis, 'after: D', params=True))
        out['fake'] = (ROWS, fake.array)
        return out
    compare(script)


# --- A segmentation network, as PSPNet and DeepLab are built -----------------
#
# One image per process, converted by ``create_mnbn_model``: it computes what
# the same network with ``L.BatchNormalization`` computes in one process on
# the concatenated batch. Pyramid pooling averages the feature map down to
# bins as small as 1x1, where a local batch of one image leaves one value
# per channel (variance zero), and ``F.resize_images`` brings each branch
# back up: these are the models synchronized batch normalization exists
# for, and ``F.resize_images`` is where an install with NumPy 1.24 or newer
# fails (``numpy.float``).

IMAGE_SIZE = 16    # input images are IMAGE_SIZE x IMAGE_SIZE
BINS = (1, 2, 4)   # pyramid pooling bins, down to 1x1


class ConvBNReLU(chainer.Chain):

    def __init__(self, in_channels, out_channels, ksize, stride=1):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(in_channels, out_channels, ksize,
                                        stride=stride, pad=ksize // 2,
                                        nobias=True)
            self.bn = L.BatchNormalization(out_channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class PyramidPooling(chainer.ChainList):
    """PSPNet's pyramid pooling: for each bin count, average pooling to
    ``bins x bins``, 1x1 conv-BN-relu, resize back; concatenated with the
    input."""

    def __init__(self, channels, bins):
        super().__init__(*[ConvBNReLU(channels, channels // len(bins), 1)
                           for _ in bins])
        self.bins = bins

    def forward(self, x):
        height, width = x.shape[2:]
        branches = [x]
        for bins, branch in zip(self.bins, self):
            k = (height // bins, width // bins)
            h = F.average_pooling_2d(x, k, stride=k)
            branches.append(F.resize_images(branch(h), (height, width)))
        return F.concat(branches, axis=1)


class TinySegmenter(chainer.Chain):
    """Encoder (stride 2), pyramid pooling, conv-BN head, per-pixel class
    scores resized to the input size, as in DeepLab's decoder."""

    def __init__(self, classes=3):
        super().__init__()
        with self.init_scope():
            self.encoder = chainer.Sequential(
                ConvBNReLU(3, 8, 3), ConvBNReLU(8, 12, 3, stride=2))
            self.pyramid = PyramidPooling(12, BINS)
            self.head = ConvBNReLU(24, 8, 3)
            self.classifier = L.Convolution2D(8, classes, 1)

    def forward(self, x):
        h = self.classifier(self.head(self.pyramid(self.encoder(x))))
        return F.resize_images(h, x.shape[2:])


def _forward_backward(model, x):
    """Output, input gradient, parameter gradients of ``sum(y ** 2)``."""
    xv = chainer.Variable(x)
    y = model(xv)
    model.cleargrads()
    F.sum(y * y).backward()
    grads = {name: param.grad.copy() for name, param in model.namedparams()}
    return y.array, xv.grad, grads


def _running_statistics(model):
    return {name: (link.avg_mean.copy(), link.avg_var.copy())
            for name, link in model.namedlinks()
            if isinstance(link, L.BatchNormalization)}


@parallel
def test_pyramid_pooling_segmenter_matches_one_process_on_whole_batch():
    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    numpy.random.seed(0)   # Chainer's initializers: same weights everywhere
    with chainer.using_config('dtype', numpy.float64):
        model = TinySegmenter()
    reference_model = copy.deepcopy(model)
    synced = multinode_bn.create_mnbn_model(model, comm)
    assert sum(isinstance(link, multinode_bn.MultiNodeBatchNormalization)
               for link in synced.links()) == 3 + len(BINS)

    images = numpy.random.RandomState(1).standard_normal(
        (size, 3, IMAGE_SIZE, IMAGE_SIZE))
    # Chainer's resize and pooling functions accept float32 only unless the
    # type check is off.
    with chainer.using_config('type_check', False):
        y_all, gx_all, grads_all = _forward_backward(reference_model, images)
        y, gx, grads = _forward_backward(synced, images[rank:rank + 1])
        with chainer.using_config('train', False):
            y_eval_all = reference_model(images).array
            y_eval = synced(images[rank:rank + 1]).array

    checks = [('output', y, y_all[rank:rank + 1]),
              ('input gradient', gx, gx_all[rank:rank + 1])]
    for name in sorted(grads_all):
        summed = comm.allreduce(grads[name])
        checks.append(('gradient of {} summed over processes'.format(name),
                       summed, grads_all[name]))
    ours, theirs = _running_statistics(synced), _running_statistics(
        reference_model)
    assert sorted(ours) == sorted(theirs)
    for name in sorted(theirs):
        checks.append(('avg_mean of ' + name, ours[name][0], theirs[name][0]))
        checks.append(('avg_var of ' + name, ours[name][1], theirs[name][1]))
    checks.append(('evaluation output', y_eval, y_eval_all[rank:rank + 1]))
    with on_every_rank() as ranks:
        for what, actual, expected in checks:
            ranks.check(numpy.testing.assert_allclose, actual, expected,
                        rtol=1e-9, atol=1e-11, err_msg='{} (shape {})'.format(
                            what, numpy.shape(actual)))
        # The 1x1 bin holds one value per channel and process: its variance
        # comes from the other processes' images alone (a local batch of one
        # image has none), and it moved the running variance.
        assert numpy.abs(ours['/pyramid/0/bn'][1] - 0.9).max() > 1e-5


def test_resize_images_runs_under_the_installed_numpy():
    # Chainer 7.8.1's F.resize_images uses numpy.float (removed in NumPy
    # 1.24): the install pins numpy<1.24 so that it runs.
    x = numpy.arange(8, dtype=numpy.float32).reshape(1, 2, 2, 2)
    y = F.resize_images(x, (3, 3)).array
    # Bilinear with aligned corners: the centre is the mean of the corners.
    numpy.testing.assert_allclose(y[:, :, 1, 1], x.mean(axis=(2, 3)))
    numpy.testing.assert_allclose(y[:, :, ::2, ::2], x)
