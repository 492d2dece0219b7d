"""Whole-model conversion both ways (``create_mnbn_model``,
``revert_mnbn_model``), and checkpoint interchange with Chainer's and
ChainerMN's links."""

import os
import tempfile
import warnings

import numpy
import pytest

import chainer
import chainer.functions as F
import chainer.links as L
import chainermn
from mpi4py import MPI

import multinode_bn
from multinode_bn import MultiNodeBatchNormalization as MNBN
from conftest import Result, assert_close, assert_matches_reference

everywhere = pytest.mark.parallel(nprocs=[1, 2, 3])


class Block(chainer.Chain):
    """conv-BN-relu-conv-BN plus a shortcut, from chainer.links only."""

    def __init__(self, channels):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(channels, channels, 3, pad=1,
                                         nobias=True)
            self.bn1 = L.BatchNormalization(channels)
            self.conv2 = L.Convolution2D(channels, channels, 3, pad=1,
                                         nobias=True)
            self.bn2 = L.BatchNormalization(channels)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class TinyResNet(chainer.Chain):
    def __init__(self, channels=4, classes=3):
        super().__init__()
        with self.init_scope():
            self.stem = chainer.Sequential(
                L.Convolution2D(2, channels, 3, pad=1, nobias=True),
                L.BatchNormalization(channels), F.relu)
            self.blocks = chainer.ChainList(Block(channels), Block(channels))
            self.head = L.Linear(channels, classes)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(F.average(h, axis=(2, 3)))


class Nested(chainer.Chain):
    """Chain > ChainList > Sequential > BN, with odd names and a subclass."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.features_0 = chainer.ChainList(
                chainer.Sequential(L.Linear(3, 4), F.relu,
                                   L.BatchNormalization(4, eps=1e-3,
                                                        decay=0.5)),
                L.BatchNormalization((4,), use_gamma=False))
            self.renorm = L.BatchRenormalization(4)
            self.lazy = L.BatchNormalization(axis=(0, 2))
            self.half = L.BatchNormalization(4, dtype=numpy.float64,
                                              use_beta=False)


def _all_bn(model, cls):
    return [(name, link) for name, link in model.namedlinks()
            if type(link) is cls]


def test_nested_model_converted_everywhere_and_original_untouched():
    model = Nested()
    bn = model.features_0[0][2]
    bn.gamma.array[:] = numpy.arange(4)
    bn.avg_mean[:] = 7.0
    bn.avg_var[:] = 2.0
    bn.N = 5
    with pytest.warns(UserWarning, match='BatchRenormalization'):
        synced = multinode_bn.create_mnbn_model(model, MPI.COMM_WORLD)
    names = [n for n, _ in _all_bn(synced, MNBN)]
    assert sorted(names) == ['/features_0/0/1', '/features_0/1', '/half',
                             '/lazy']
    assert type(synced.renorm) is L.BatchRenormalization
    assert len(_all_bn(model, L.BatchNormalization)) == 4
    assert len(_all_bn(model, MNBN)) == 0
    converted = synced.features_0[0][2]
    assert converted.comm is MPI.COMM_WORLD
    assert converted.decay == 0.5 and converted.eps == 1e-3
    assert converted.N == 5
    numpy.testing.assert_array_equal(converted.gamma.array, numpy.arange(4))
    numpy.testing.assert_array_equal(converted.avg_mean, 7.0)
    numpy.testing.assert_array_equal(converted.avg_var, 2.0)
    assert synced.features_0[1].gamma is None
    assert synced.half.beta is None
    assert synced.half.avg_mean.dtype == numpy.float64
    assert synced.lazy.avg_mean is None and synced.lazy.axis == (0, 2)
    # independent copies: the original does not move with the copy
    converted.gamma.array[:] = -1
    converted.avg_mean[:] = -1
    synced.features_0[0][0].W.array[:] = 0
    assert (bn.gamma.array == numpy.arange(4)).all()
    assert (bn.avg_mean == 7.0).all()
    assert (model.features_0[0][0].W.array != 0).any()
    assert synced.features_0[0][0].W is not model.features_0[0][0].W


def test_single_link_is_converted_and_reverted():
    bn = L.BatchNormalization(3)
    synced = multinode_bn.create_mnbn_model(bn, MPI.COMM_WORLD)
    assert type(synced) is MNBN
    back = multinode_bn.revert_mnbn_model(synced)
    assert type(back) is L.BatchNormalization
    assert synced.comm is MPI.COMM_WORLD


def test_lazy_link_conversion_keeps_pending_initial_statistics():
    bn = L.BatchNormalization(None, axis=0, initial_avg_mean=1.0,
                              initial_avg_var=4.0)
    synced = multinode_bn.create_mnbn_model(bn, MPI.COMM_SELF)
    back = multinode_bn.revert_mnbn_model(synced)
    x = numpy.full((2, 3), 3.0, numpy.float32)
    with chainer.using_config('train', False):
        for link in (bn, synced, back):
            numpy.testing.assert_allclose(link(x).array, 1.0, rtol=1e-4)


def test_round_trip_reproduces_eval_outputs_bit_for_bit():
    rng = numpy.random.RandomState(0)
    model = TinyResNet()
    for _, link in _all_bn(model, L.BatchNormalization):
        link.avg_mean[:] = rng.randn(*link.avg_mean.shape)
        link.avg_var[:] = rng.rand(*link.avg_var.shape) + 0.5
        link.gamma.array[:] = rng.rand(*link.gamma.shape) + 0.5
        link.beta.array[:] = rng.randn(*link.beta.shape)
    back = multinode_bn.revert_mnbn_model(
        multinode_bn.create_mnbn_model(model, MPI.COMM_WORLD))
    assert len(_all_bn(back, L.BatchNormalization)) == 5
    x = rng.randn(3, 2, 6, 6).astype(numpy.float32)
    with chainer.using_config('train', False):
        numpy.testing.assert_array_equal(model(x).array, back(x).array)


def _train(model, comm, batches, labels, steps, lr=0.1):
    optimizer = chainer.optimizers.SGD(lr)
    optimizer.setup(model)
    for step in range(steps):
        model.cleargrads()
        loss = F.softmax_cross_entropy(model(batches[step]), labels[step])
        loss.backward()
        if comm is not None:
            # The data-parallel mean of gradients, as ChainerMN's
            # multi-node optimizer does from its second update on.
            comm.multi_node_mean_grad(model)
        optimizer.update()


@pytest.mark.parallel(nprocs=[2, 3])
def test_converted_model_trained_under_mpi_equals_single_process_training():
    world = MPI.COMM_WORLD
    comm = chainermn.create_communicator('naive')
    per_rank, steps = 2, 3
    rng = numpy.random.RandomState(1)
    xs = rng.randn(steps, per_rank * world.size, 2, 6, 6).astype(numpy.float32)
    ts = rng.randint(0, 3, size=(steps, per_rank * world.size)).astype(
        numpy.int32)
    numpy.random.seed(2)
    original = TinyResNet()
    synced = multinode_bn.create_mnbn_model(original, comm)
    _train(original, None, xs, ts, steps)
    mine = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
    _train(synced, comm, xs[:, mine], ts[:, mine], steps)

    for (name, p), (_, q) in zip(sorted(original.namedparams()),
                                 sorted(synced.namedparams())):
        assert_close(q.array, p.array, 1e-4, 1e-5, 'param ' + name)
    theirs_bn = dict(_all_bn(original, L.BatchNormalization))
    for name, link in _all_bn(synced, MNBN):
        assert_close(link.avg_mean, theirs_bn[name].avg_mean, 1e-4, 1e-5,
                     name + ' avg_mean')
        assert_close(link.avg_var, theirs_bn[name].avg_var, 1e-4, 1e-5,
                     name + ' avg_var')

    reverted = multinode_bn.revert_mnbn_model(synced)
    test_x = rng.randn(4, 2, 6, 6).astype(numpy.float32)
    with chainer.using_config('train', False):
        assert_close(reverted(test_x).array, original(test_x).array,
                     1e-4, 1e-5, 'eval after revert')


def _bn_chain(bn):
    chain = chainer.Chain()
    with chain.init_scope():
        chain.bn = bn
    return chain


def _fill(bn, seed):
    rng = numpy.random.RandomState(seed)
    bn.gamma.array[:] = rng.rand(4)
    bn.beta.array[:] = rng.rand(4)
    bn.avg_mean[:] = rng.rand(4)
    bn.avg_var[:] = rng.rand(4) + 1
    bn.N = seed


@pytest.mark.parametrize('fmt', ['npz', 'hdf5'])
def test_checkpoints_interchange_with_chainer_and_chainermn_links(fmt):
    if fmt == 'hdf5':
        pytest.importorskip('h5py')
    save = getattr(chainer.serializers, 'save_' + fmt)
    load = getattr(chainer.serializers, 'load_' + fmt)
    comm = chainermn.create_communicator('naive')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        makers = {
            'chainer': lambda: L.BatchNormalization(4),
            'ours': lambda: MNBN(4, comm),
            'chainermn': lambda: chainermn.links.MultiNodeBatchNormalization(
                4, comm),
        }
        for seed, (src_name, src_make) in enumerate(makers.items(), 1):
            src = _bn_chain(src_make())
            _fill(src.bn, seed)
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, 'model.' + fmt)
                save(path, src)
                for dst_name, dst_make in makers.items():
                    dst = _bn_chain(dst_make())
                    load(path, dst)
                    for attr in ('avg_mean', 'avg_var'):
                        numpy.testing.assert_array_equal(
                            getattr(dst.bn, attr), getattr(src.bn, attr),
                            err_msg='{} -> {}'.format(src_name, dst_name))
                    for attr in ('gamma', 'beta'):
                        numpy.testing.assert_array_equal(
                            getattr(dst.bn, attr).array,
                            getattr(src.bn, attr).array)
                    assert int(dst.bn.N) == seed


def test_checkpoint_interchanges_with_chainer_batch_normalization():
    rng = numpy.random.RandomState(6)
    ours = MNBN(4, MPI.COMM_SELF)
    theirs = L.BatchNormalization(4)
    ours.gamma.array[:] = rng.rand(4)
    ours.beta.array[:] = rng.rand(4)
    ours.avg_mean[:] = rng.rand(4)
    ours.avg_var[:] = rng.rand(4) + 1
    ours.N = 7
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, 'bn.npz')
        chainer.serializers.save_npz(path, ours)
        chainer.serializers.load_npz(path, theirs)
        for name in ('avg_mean', 'avg_var'):
            numpy.testing.assert_array_equal(getattr(theirs, name),
                                             getattr(ours, name))
        numpy.testing.assert_array_equal(theirs.gamma.array, ours.gamma.array)
        numpy.testing.assert_array_equal(theirs.beta.array, ours.beta.array)
        assert int(theirs.N) == 7
        back = MNBN(4, MPI.COMM_SELF)
        theirs.avg_mean *= 3
        chainer.serializers.save_npz(path, theirs)
        chainer.serializers.load_npz(path, back)
        numpy.testing.assert_array_equal(back.avg_mean, theirs.avg_mean)
        numpy.testing.assert_array_equal(back.gamma.array, theirs.gamma.array)
    x = rng.randn(3, 4).astype(numpy.float32)
    with chainer.using_config('train', False):
        numpy.testing.assert_array_equal(back(x).array, theirs(x).array)


def test_revert_also_accepts_chainermn_links():
    comm = chainermn.create_communicator('naive')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        theirs = chainermn.links.MultiNodeBatchNormalization(4, comm)
    _fill(theirs, 3)
    back = multinode_bn.revert_mnbn_model(_bn_chain(theirs))
    assert type(back.bn) is L.BatchNormalization
    numpy.testing.assert_array_equal(back.bn.avg_var, theirs.avg_var)
    assert back.bn.N == 3


def _with_lambda():
    """A Sequential holding a lambda, which Chainer refuses to copy."""
    return chainer.Sequential(
        L.Linear(3, 4, nobias=True), L.BatchNormalization(4),
        lambda h: F.relu(h) * 2, L.Linear(4, 2))


def test_sequential_with_lambda_raises_error_naming_cause_and_in_place():
    model = chainer.Chain()
    with model.init_scope():
        model.body = _with_lambda()
    with pytest.raises(ValueError) as info:
        multinode_bn.create_mnbn_model(model, MPI.COMM_WORLD)
    message = str(info.value)
    assert 'create_mnbn_model' in message and 'lambda' in message
    assert 'cannot be copied' in message and 'in_place=True' in message
    assert type(model.body[1]) is L.BatchNormalization   # left as it was
    local = chainer.Sequential(MNBN(4, MPI.COMM_WORLD), lambda h: h)
    with pytest.raises(ValueError, match='revert_mnbn_model.*in_place=True'):
        multinode_bn.revert_mnbn_model(local)


def test_sequential_with_lambda_converted_and_reverted_in_place():
    model = _with_lambda()
    bn, step = model[1], model[2]
    bn.gamma.array[:] = [1, 2, 3, 4]
    bn.avg_mean[:] = 5.0
    keys = sorted(name for name, _ in model.namedparams())
    converted = multinode_bn.create_mnbn_model(model, MPI.COMM_WORLD,
                                               in_place=True)
    assert converted is model
    assert type(model[1]) is MNBN and model[1].comm is MPI.COMM_WORLD
    assert model[1].gamma is bn.gamma            # the same parameter
    assert (model[1].avg_mean == 5.0).all()
    assert model[2] is step and len(model) == 4
    assert sorted(name for name, _ in model.namedparams()) == keys
    reverted = multinode_bn.revert_mnbn_model(model, in_place=True)
    assert reverted is model and type(model[1]) is L.BatchNormalization
    assert model[1].gamma is bn.gamma and model[2] is step
    # A model that is a batch normalization itself is replaced, not changed.
    single = L.BatchNormalization(3)
    synced = multinode_bn.create_mnbn_model(single, MPI.COMM_WORLD,
                                            in_place=True)
    assert type(synced) is MNBN and type(single) is L.BatchNormalization


@pytest.mark.parallel(nprocs=[2, 3])
def test_sequential_with_lambda_converted_in_place_matches_global_bn():
    world = MPI.COMM_WORLD
    sizes = [2 + r for r in range(world.size)]
    numpy.random.seed(3)
    model = _with_lambda()
    numpy.random.seed(3)
    reference_model = _with_lambda()     # the same weights
    multinode_bn.create_mnbn_model(model, world, in_place=True)
    rng = numpy.random.RandomState(4)
    xs = [rng.randn(n, 3).astype(numpy.float32) for n in sizes]
    offset, n = sum(sizes[:world.rank]), sizes[world.rank]

    def run(net, x):
        xv = chainer.Variable(x)
        y = net(xv)
        F.sum(y * y).backward()
        return y.array, xv.grad, net[1]

    y, gx, ours = run(model, xs[world.rank])
    y_all, gx_all, theirs = run(reference_model, numpy.concatenate(xs))
    assert_matches_reference(
        Result(y, gx, None, None, ours.avg_mean, ours.avg_var),
        Result(y_all, gx_all, None, None, theirs.avg_mean, theirs.avg_var),
        offset, n, world.size, rtol=1e-4, atol=1e-5, params=False)


# --- Sequential models with plain functions: checkpoint keys kept ------------

def sequential_with_function(seed):
    model = chainer.Sequential(L.Linear(4, 4), F.relu, L.BatchNormalization(4),
                               L.Linear(4, 4))
    rng = numpy.random.RandomState(seed)
    for param in model.params():
        param.array[...] = rng.standard_normal(param.shape)
    bn = model[2]
    bn.avg_mean[...] = rng.standard_normal(4)
    bn.avg_var[...] = rng.uniform(1, 2, 4)
    bn.N = seed
    return model


def saved(model):
    """The checkpoint of ``model``: key -> array."""
    handle, path = tempfile.mkstemp(suffix='.npz')
    os.close(handle)
    try:
        chainer.serializers.save_npz(path, model)
        with numpy.load(path) as npz:
            return {key: npz[key] for key in npz.files}
    finally:
        os.remove(path)


def load(model, checkpoint):
    handle, path = tempfile.mkstemp(suffix='.npz')
    os.close(handle)
    try:
        numpy.savez(path, **checkpoint)
        chainer.serializers.load_npz(path, model)
    finally:
        os.remove(path)


def eval_output(model, x):
    with chainer.using_config('train', False):
        return model(x).array


@everywhere
def test_sequential_conversion_keeps_checkpoint_keys_and_values():
    model = sequential_with_function(1)
    original = saved(model)
    converted = multinode_bn.create_mnbn_model(model, MPI.COMM_WORLD)
    reverted = multinode_bn.revert_mnbn_model(converted)
    for copy in (converted, reverted):
        mine = saved(copy)
        assert sorted(mine) == sorted(original)
        for key, value in original.items():
            # The two Linear(4, 4) have the same shape: a swap of their keys
            # would load silently with the wrong weights.
            numpy.testing.assert_array_equal(mine[key], value, err_msg=key)
    assert isinstance(converted[2], multinode_bn.MultiNodeBatchNormalization)
    assert converted[1] is F.relu
    x = numpy.random.RandomState(2).randn(5, 4).astype(numpy.float32)
    expected = eval_output(model, x)
    numpy.testing.assert_array_equal(eval_output(converted, x), expected)
    numpy.testing.assert_array_equal(eval_output(reverted, x), expected)


@everywhere
def test_checkpoint_of_original_loads_into_converted_and_reverted_models():
    model = sequential_with_function(1)
    checkpoint = saved(model)
    x = numpy.random.RandomState(3).randn(5, 4).astype(numpy.float32)
    expected = eval_output(model, x)
    # Differently initialized models of the same architecture.
    converted = multinode_bn.create_mnbn_model(sequential_with_function(7),
                                               MPI.COMM_WORLD)
    reverted = multinode_bn.revert_mnbn_model(converted)
    for target in (converted, reverted):
        load(target, checkpoint)
        numpy.testing.assert_array_equal(eval_output(target, x), expected)
        assert target[2].N == 1
        numpy.testing.assert_array_equal(target[0].W.array, model[0].W.array)
        numpy.testing.assert_array_equal(target[3].W.array, model[3].W.array)
