"""Exact population statistics over the data of all processes."""

import warnings

import numpy
import pytest

import chainer
import chainer.functions as F
import chainer.links as L
from mpi4py import MPI

import multinode_bn
from conftest import assert_close, on_every_rank

everywhere = pytest.mark.parallel(nprocs=[1, 2, 3])

EPS = 2e-5


def shard_sizes(pattern, size):
    """Local dataset sizes of the ``size`` processes."""
    return {'uneven': [7, 3, 5], 'one_empty': [6, 0, 5],
            'equal': [4, 4, 4]}[pattern][:size]


def dataset(seed, total, n_in=3):
    rng = numpy.random.RandomState(seed)
    return (3.0 + 2.0 * rng.standard_normal((total, n_in))).astype(
        numpy.float64)


def shards_of(data, sizes):
    offsets = numpy.cumsum([0] + sizes)
    return [data[offsets[r]:offsets[r + 1]] for r in range(len(sizes))]


def build_model(comm, dtype=numpy.float64):
    """Linear -> synchronized BN -> relu -> Linear -> synchronized BN."""
    with chainer.using_config('dtype', dtype):
        model = chainer.Sequential(
            L.Linear(3, 4), multinode_bn.MultiNodeBatchNormalization(
                4, comm, dtype=dtype),
            F.relu, L.Linear(4, 2),
            multinode_bn.MultiNodeBatchNormalization(2, comm, dtype=dtype))
    rng = numpy.random.RandomState(5)
    for param in model.params():
        param.array[...] = rng.uniform(0.5, 1.5, param.shape)
    return model


def reference_statistics(model, shards, batch, steps):
    """float64 NumPy: the inputs each BN sees over ``steps`` global batches
    (rank by rank, ``batch`` samples each), then their mean and unbiased
    variance."""
    def p(index, name):
        return numpy.asarray(getattr(model[index], name).array,
                             numpy.float64)

    seen1, seen2 = [], []
    for s in range(steps):
        x = numpy.concatenate([sh[s * batch:(s + 1) * batch] for sh in shards])
        h1 = x @ p(0, 'W').T + p(0, 'b')
        seen1.append(h1)
        mean, var = h1.mean(axis=0), h1.var(axis=0)
        y1 = (h1 - mean) / numpy.sqrt(var + EPS) * p(1, 'gamma') + p(1, 'beta')
        h2 = numpy.maximum(y1, 0) @ p(3, 'W').T + p(3, 'b')
        seen2.append(h2)
    return [(numpy.mean(numpy.concatenate(seen), axis=0),
             numpy.var(numpy.concatenate(seen), axis=0, ddof=1))
            for seen in (seen1, seen2)]


def parameters_of(model):
    """Copies of every parameter and its gradient."""
    state = {}
    for name, param in model.namedparams():
        state[name] = param.array.copy()
        state[name + '.grad'] = None if param.grad is None else \
            param.grad.copy()
    return state


def assert_identical_on_every_rank(arrays, what):
    gathered = MPI.COMM_WORLD.allgather([a.tobytes() for a in arrays])
    assert all(g == gathered[0] for g in gathered), (
        '{} differ between ranks'.format(what))


def check_statistics(ranks, bn, mean, var, rtol, atol):
    """``bn``'s running statistics against ``mean`` and ``var``, as checks
    of ``ranks`` (an :class:`on_every_rank` block)."""
    ranks.check(assert_close, bn.avg_mean, mean, rtol, atol, 'avg_mean')
    ranks.check(assert_close, bn.avg_var, var, rtol, atol, 'avg_var')


@everywhere
@pytest.mark.parametrize('pattern', ['uneven', 'one_empty'])
def test_exhausting_uneven_shards_gives_population_statistics_of_all_data(
        pattern):
    comm = MPI.COMM_WORLD
    sizes = shard_sizes(pattern, comm.size)
    shards = shards_of(dataset(0, sum(sizes)), sizes)
    model = build_model(comm)
    before = parameters_of(model)
    it = chainer.iterators.SerialIterator(shards[comm.rank], 2, repeat=False,
                                          shuffle=False)

    steps = multinode_bn.update_population_statistics(model, it, comm)

    assert steps == -(-max(sizes) // 2)
    expected = reference_statistics(model, shards, 2, steps)
    with on_every_rank() as ranks:
        check_statistics(ranks, model[1], *expected[0], 1e-10, 1e-12)
        check_statistics(ranks, model[4], *expected[1], 1e-10, 1e-12)
    assert model[1].N == model[4].N == steps
    assert_identical_on_every_rank(
        [model[1].avg_mean, model[1].avg_var, model[4].avg_mean,
         model[4].avg_var], 'population statistics')
    for name, value in parameters_of(model).items():
        numpy.testing.assert_array_equal(value, before[name], err_msg=name)


@everywhere
def test_n_batches_of_repeating_iterators_counts_each_sample_seen():
    comm = MPI.COMM_WORLD
    sizes = shard_sizes('equal', comm.size)
    shards = shards_of(dataset(1, sum(sizes)), sizes)
    model = build_model(comm)
    it = chainer.iterators.SerialIterator(shards[comm.rank], 3, repeat=True,
                                          shuffle=False)
    steps = multinode_bn.update_population_statistics(model, it, comm,
                                                      n_batches=2)
    assert steps == 2
    # Two batches of 3 from 4 samples: samples 0, 1, 2, 3, 0, 1 per rank.
    order = [0, 1, 2, 3, 0, 1]
    replayed = [sh[order] for sh in shards]
    expected = reference_statistics(model, replayed, 3, 2)
    with on_every_rank() as ranks:
        check_statistics(ranks, model[1], *expected[0], 1e-10, 1e-12)
        check_statistics(ranks, model[4], *expected[1], 1e-10, 1e-12)
    assert it.current_position == 2 and it.epoch == 1  # advanced, not rewound


@everywhere
def test_float32_model_statistics_match_float64_numpy_and_agree_bitwise():
    comm = MPI.COMM_WORLD
    sizes = shard_sizes('uneven', comm.size)
    data = dataset(2, sum(sizes))
    shards = shards_of(data, sizes)
    model = build_model(comm, numpy.float32)
    it = chainer.iterators.SerialIterator(
        shards[comm.rank].astype(numpy.float32), 2, repeat=False,
        shuffle=False)
    multinode_bn.update_population_statistics(model, it, comm)
    h1 = data.astype(numpy.float32).astype(numpy.float64) @ numpy.asarray(
        model[0].W.array, numpy.float64).T + model[0].b.array
    with on_every_rank() as ranks:
        check_statistics(ranks, model[1], h1.mean(axis=0),
                         h1.var(axis=0, ddof=1), 1e-5, 1e-5)
    assert model[1].avg_mean.dtype == numpy.float32
    assert_identical_on_every_rank(
        [model[1].avg_mean, model[1].avg_var, model[4].avg_mean,
         model[4].avg_var], 'population statistics')


@everywhere
def test_plain_chainer_bn_gets_statistics_of_its_own_process_only():
    comm = MPI.COMM_WORLD
    sizes = shard_sizes('uneven', comm.size)
    shards = shards_of(dataset(3, sum(sizes)), sizes)
    model = chainer.Sequential(L.BatchNormalization(3, dtype=numpy.float64))
    model[0].avg_mean[...] = 100.0
    it = chainer.iterators.SerialIterator(shards[comm.rank], 2, repeat=False,
                                          shuffle=False)
    multinode_bn.update_population_statistics(model, it, comm)
    local = shards[comm.rank]
    with on_every_rank() as ranks:
        check_statistics(ranks, model[0], local.mean(axis=0),
                         local.var(axis=0, ddof=1), 1e-12, 1e-12)


@everywhere
def test_other_persistents_and_unused_links_are_left_as_they_were():
    comm = MPI.COMM_WORLD
    model = build_model(comm)
    renorm = L.BatchRenormalization(2, dtype=numpy.float64)
    unused = multinode_bn.MultiNodeBatchNormalization(2, comm,
                                                      dtype=numpy.float64)
    unused.avg_mean[...] = 7.0
    model.append(renorm)
    holder = chainer.Chain()
    with holder.init_scope():
        holder.model = model
        holder.unused = unused
    renorm_mean = renorm.avg_mean.copy()
    data = dataset(4, 4)
    it = chainer.iterators.SerialIterator(data, 2, repeat=False,
                                          shuffle=False)
    with pytest.warns(UserWarning, match='/unused received no input'):
        multinode_bn.update_population_statistics(
            holder, it, comm, forward=holder.model)
    numpy.testing.assert_array_equal(renorm.avg_mean, renorm_mean)
    assert (unused.avg_mean == 7.0).all() and unused.N == 0
    assert model[1].N == 2


@pytest.mark.parallel(nprocs=[2, 3])
def test_converter_failure_on_one_rank_raises_on_every_rank():
    comm = MPI.COMM_WORLD
    model = build_model(comm)
    before = [model[1].avg_mean.copy(), model[1].avg_var.copy()]

    def converter(batch, device=None):
        if comm.rank == 1:
            raise KeyError('broken example')
        return chainer.dataset.concat_examples(batch, device)

    it = chainer.iterators.SerialIterator(dataset(5, 4), 2, repeat=False,
                                          shuffle=False)
    with pytest.raises(RuntimeError, match=r'rank\(s\) 1:[\s\S]*broken'):
        multinode_bn.update_population_statistics(model, it, comm,
                                                  converter=converter)
    numpy.testing.assert_array_equal(model[1].avg_mean, before[0])
    numpy.testing.assert_array_equal(model[1].avg_var, before[1])


@everywhere
def test_tuple_batches_call_the_model_with_each_array():
    comm = MPI.COMM_WORLD
    sizes = shard_sizes('one_empty', comm.size)
    data = dataset(6, sum(sizes))
    labels = numpy.arange(sum(sizes), dtype=numpy.int32) % 2
    offsets = numpy.cumsum([0] + sizes)
    mine = slice(offsets[comm.rank], offsets[comm.rank + 1])
    predictor = build_model(comm)
    classifier = L.Classifier(predictor)
    it = chainer.iterators.SerialIterator(
        list(zip(data[mine], labels[mine])), 2, repeat=False, shuffle=False)
    multinode_bn.update_population_statistics(classifier, it, comm)
    h1 = data @ predictor[0].W.array.T + predictor[0].b.array
    with on_every_rank() as ranks:
        check_statistics(ranks, predictor[1], h1.mean(axis=0),
                         h1.var(axis=0, ddof=1), 1e-10, 1e-12)


@pytest.mark.parallel(nprocs=[2, 3])
def test_nested_batches_reach_processes_without_data_as_empty_ones():
    comm = MPI.COMM_WORLD
    sizes = shard_sizes('one_empty', comm.size)
    data = dataset(7, sum(sizes))
    mine = shards_of(data, sizes)[comm.rank]
    model = build_model(comm)

    def converter(batch, device=None):  # (x, (targets, weights))
        x = chainer.dataset.concat_examples(batch, device)
        return x, (x[:, 0], {'weights': x[:, 1:]})

    it = chainer.iterators.SerialIterator(mine, 2, repeat=False,
                                          shuffle=False)
    steps = multinode_bn.update_population_statistics(
        model, it, comm, converter=converter,
        forward=lambda x, extra: model(x))
    h1 = data @ model[0].W.array.T + model[0].b.array
    with on_every_rank() as ranks:
        check_statistics(ranks, model[1], h1.mean(axis=0),
                         h1.var(axis=0, ddof=1), 1e-10, 1e-12)
        assert steps == 3, steps


@pytest.mark.parallel(nprocs=[2, 3])
def test_processes_with_different_models_raise_on_every_rank():
    comm = MPI.COMM_WORLD
    model, holder = build_model(comm), chainer.Chain()
    with holder.init_scope():
        holder.net = model
        if comm.rank == 1:  # one more, never called: the models differ
            holder.unused = multinode_bn.MultiNodeBatchNormalization(2, comm)
    it = chainer.iterators.SerialIterator(dataset(8, 4), 2, repeat=False,
                                          shuffle=False)
    with pytest.raises(multinode_bn.InconsistentInputError,
                       match=r'different batch normalizations[\s\S]*rank 1'):
        multinode_bn.update_population_statistics(holder, it, comm,
                                                  forward=model)


@pytest.mark.parallel(nprocs=[1, 2])
def test_channel_last_inputs_are_recorded_on_their_logical_axes():
    comm = MPI.COMM_WORLD
    sizes = shard_sizes('uneven', comm.size)
    rng = numpy.random.RandomState(7)
    data = (2.0 + rng.standard_normal((sum(sizes), 3, 2, 2)))
    offsets = numpy.cumsum([0] + sizes)
    bn = multinode_bn.MultiNodeBatchNormalization(3, comm,
                                                  dtype=numpy.float64)

    def channel_last(x):
        return bn(chainer.Variable(x).as_layout(
            chainer.memory_layouts.CUDNN_CHANNEL_LAST_X))

    it = chainer.iterators.SerialIterator(
        data[offsets[comm.rank]:offsets[comm.rank + 1]], 2, repeat=False,
        shuffle=False)
    multinode_bn.update_population_statistics(bn, it, comm,
                                              forward=channel_last)
    with on_every_rank() as ranks:
        check_statistics(ranks, bn, data.mean(axis=(0, 2, 3)),
                         data.var(axis=(0, 2, 3), ddof=1), 1e-12, 1e-12)


@pytest.mark.parallel(nprocs=[2])
def test_extension_runs_before_chainermn_multi_node_evaluator(tmp_path):
    import chainermn
    from chainer import training
    from chainer.training import extensions

    mpi = MPI.COMM_WORLD
    comm = chainermn.create_communicator('naive', mpi)
    rng = numpy.random.RandomState(8)
    train_x = rng.standard_normal((8, 3)).astype(numpy.float32) * 2 + 1
    train_t = (train_x[:, 0] > 1).astype(numpy.int32)
    val_x = rng.standard_normal((6, 3)).astype(numpy.float32) * 2 + 1
    val_t = (val_x[:, 1] > 1).astype(numpy.int32)
    train = list(zip(train_x, train_t))[4 * mpi.rank:4 * mpi.rank + 4]
    mine = slice(3 * mpi.rank, 3 * mpi.rank + 3)

    predictor = chainer.Sequential(
        L.Linear(3, 4), multinode_bn.MultiNodeBatchNormalization(4, comm),
        F.relu, L.Linear(4, 2))
    predictor[0].W.array[...] = numpy.random.RandomState(9).standard_normal(
        (4, 3))
    predictor[3].W.array[...] = numpy.random.RandomState(10).standard_normal(
        (2, 4))
    model = L.Classifier(predictor)
    optimizer = chainermn.create_multi_node_optimizer(
        chainer.optimizers.SGD(0.1), comm)
    optimizer.setup(model)
    updater = training.StandardUpdater(
        chainer.iterators.SerialIterator(train, 2, shuffle=False), optimizer)
    trainer = training.Trainer(updater, (2, 'epoch'), out=str(tmp_path))
    trainer.extend(multinode_bn.PopulationStatistics(
        chainer.iterators.SerialIterator(train, 2, repeat=False,
                                         shuffle=False), comm))
    val_iter = chainer.iterators.SerialIterator(
        list(zip(val_x[mine], val_t[mine])), 3, repeat=False, shuffle=False)
    trainer.extend(chainermn.create_multi_node_evaluator(
        extensions.Evaluator(val_iter, model), comm))
    reported = []
    trainer.extend(lambda t: reported.append(
        float(t.observation['validation/main/loss'])), trigger=(1, 'epoch'))
    trainer.run()

    # The last run used the final parameters: population statistics of the
    # first BN's input over the training data of both processes.
    h = train_x.astype(numpy.float64) @ predictor[0].W.array.T.astype(
        numpy.float64) + predictor[0].b.array
    with on_every_rank() as ranks:
        check_statistics(ranks, predictor[1], h.mean(axis=0),
                         h.var(axis=0, ddof=1), 1e-5, 1e-5)
    # ... and the evaluation that followed used them: the mean over the
    # processes of each one's validation loss in evaluation mode now.
    with chainer.using_config('train', False):
        mine_loss = float(F.softmax_cross_entropy(
            predictor(val_x[mine]), val_t[mine]).array)
    expected = sum(mpi.allgather(mine_loss)) / mpi.size
    assert len(reported) == 2
    assert abs(reported[-1] - expected) < 1e-5, (reported, expected)


@pytest.mark.parallel(nprocs=[2, 3])
def test_links_on_sub_communicators_merge_over_their_group_only():
    world = MPI.COMM_WORLD
    group = world.Split(world.rank % 2, world.rank)
    sizes = [6, 5, 0][:world.size]  # groups {0, 2} and {1}
    data = dataset(11, sum(sizes))
    shards = shards_of(data, sizes)
    bn = multinode_bn.MultiNodeBatchNormalization(3, group,
                                                  dtype=numpy.float64)
    it = chainer.iterators.SerialIterator(shards[world.rank], 2,
                                          repeat=False, shuffle=False)
    multinode_bn.update_population_statistics(bn, it, world)
    mates = numpy.concatenate([shards[r] for r in range(world.size)
                               if r % 2 == world.rank % 2])
    with on_every_rank() as ranks:
        check_statistics(ranks, bn, mates.mean(axis=0),
                         mates.var(axis=0, ddof=1), 1e-12, 1e-12)
    group.Free()


@pytest.mark.parallel(nprocs=[2, 3])
def test_model_refusing_empty_batches_raises_on_every_rank_when_a_shard_ends():
    comm = MPI.COMM_WORLD
    bn = multinode_bn.MultiNodeBatchNormalization(3, comm,
                                                  dtype=numpy.float64)
    before = bn.avg_mean.copy()

    def pooled(x):  # max pooling refuses an empty batch
        return F.max_pooling_2d(bn(x), 2)

    data = numpy.ones((4 if comm.rank == 0 else 2, 3, 2, 2))
    it = chainer.iterators.SerialIterator(data, 2, repeat=False,
                                          shuffle=False)
    with pytest.raises(RuntimeError, match='does not accept an empty batch'):
        multinode_bn.update_population_statistics(bn, it, comm,
                                                  forward=pooled)
    numpy.testing.assert_array_equal(bn.avg_mean, before)


@everywhere
def test_link_called_twice_per_batch_counts_both_inputs():
    comm = MPI.COMM_WORLD
    sizes = shard_sizes('uneven', comm.size)
    data = dataset(12, sum(sizes))
    shards = shards_of(data, sizes)
    bn = multinode_bn.MultiNodeBatchNormalization(3, comm,
                                                  dtype=numpy.float64)
    holder = chainer.Chain()
    with holder.init_scope():
        holder.first = bn
        holder.again = bn  # the same link under two names

    def twice(x):
        return bn(x * 2.0), bn(x)

    it = chainer.iterators.SerialIterator(shards[comm.rank], 2,
                                          repeat=False, shuffle=False)
    steps = multinode_bn.update_population_statistics(holder, it, comm,
                                                      forward=twice)
    both = numpy.concatenate([data * 2.0, data])
    with on_every_rank() as ranks:
        check_statistics(ranks, bn, both.mean(axis=0),
                         both.var(axis=0, ddof=1), 1e-12, 1e-12)
    assert bn.N == 2 * steps


@everywhere
def test_population_statistics_of_uneven_shards_are_exact_without_warnings():
    comm = MPI.COMM_WORLD
    sizes = [23, 29, 17][:comm.size]
    data = 3.0 + numpy.random.RandomState(12).standard_normal(
        (sum(sizes), 3))
    mine = shards_of(data, sizes)[comm.rank].copy()
    model = chainer.Sequential(multinode_bn.MultiNodeBatchNormalization(
        3, comm, dtype=numpy.float64))
    it = chainer.iterators.SerialIterator(mine, 5, repeat=False,
                                          shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        multinode_bn.update_population_statistics(model, it, comm)
    warned = [str(w.message) for w in caught
              if not issubclass(w.category, (DeprecationWarning,
                                             FutureWarning))]
    with on_every_rank() as ranks:
        for what, expected in (('avg_mean', data.mean(axis=0)),
                               ('avg_var', data.var(axis=0, ddof=1))):
            # atol relative to the largest expected magnitude
            scale = max(1.0, numpy.abs(expected).max())
            ranks.check(assert_close, getattr(model[0], what), expected,
                        1e-12, 1e-12 * scale, what)
        assert not warned, 'warned: {}'.format(warned)


@pytest.mark.parametrize('offset', [5.0, 1e4])
@pytest.mark.parametrize('axis', [(0,), (0, 2, 3), (0, 2), (1, 3)])
def test_recorded_moments_match_float64_two_pass_for_any_kept_axes(axis,
                                                                   offset):
    from multinode_bn.population import _local_moments
    x = (offset + numpy.random.RandomState(13).standard_normal(
        (4, 3, 2, 5))).astype(numpy.float32)
    moments = _local_moments(x, axis)
    # Two passes in float64: the mean, then squared deviations from it.
    x64 = x.astype(numpy.float64)
    mean = x64.mean(axis=axis, keepdims=True)
    m2 = ((x64 - mean) ** 2).sum(axis=axis)
    keep_shape = [d for i, d in enumerate(x.shape) if i not in axis]
    count = x.size // int(numpy.prod(keep_shape))
    numpy.testing.assert_array_equal(moments[:, 0], count)
    numpy.testing.assert_allclose(moments[:, 1], mean.ravel(), rtol=1e-14)
    numpy.testing.assert_allclose(moments[:, 2], m2.ravel(), rtol=1e-12)
    empty = _local_moments(numpy.take(x, [], axis=axis[0]), axis)
    assert empty.shape == (int(numpy.prod(keep_shape)), 3)
    assert not empty.any()
