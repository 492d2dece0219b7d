"""Drop-in where Chainer's own tests look: memory layouts, exception type,
warnings, and conversion of Sequential models with plain functions."""

import os
import tempfile
import warnings

import numpy
import pytest

import chainer
import chainer.functions as F
import chainer.links as L
from chainer import memory_layouts
from chainer.utils import type_check
from mpi4py import MPI

import multinode_bn
from conftest import (Result, assert_matches_reference, make_batches,
                      reference, split_sizes)

everywhere = pytest.mark.parallel(nprocs=[1, 2, 3])
CHANNEL_LAST = memory_layouts.CUDNN_CHANNEL_LAST_X


def all_ranks(flag):
    """Whether ``flag`` holds on every rank (collective)."""
    return all(MPI.COMM_WORLD.allgather(bool(flag)))


# -- 1. memory layouts ------------------------------------------------------

def run_channel_last(link, x, gy):
    """Forward and backward of ``link`` on ``x`` handed over channels last."""
    xv = chainer.Variable(x)
    y = link(xv.as_layout(CHANNEL_LAST))
    assert y.layout == CHANNEL_LAST and y.shape == x.shape
    y = y.as_layout(None)
    link.cleargrads()
    F.sum(y * gy).backward()
    return Result(y.array, xv.grad, link.gamma.grad, link.beta.grad,
                  numpy.array(link.avg_mean), numpy.array(link.avg_var))


@everywhere
@pytest.mark.parametrize('dtype', [numpy.float32, numpy.float64])
def test_channel_last_input_matches_global_bn_on_logical_shape(dtype):
    comm = MPI.COMM_WORLD
    sizes = [3, 1, 2][:comm.size]
    xs, gys = make_batches(0, sizes, (3, 4, 5), dtype)
    ref = reference(xs, gys, 3)
    offset, n = split_sizes(sizes, comm.rank)
    link = multinode_bn.MultiNodeBatchNormalization(3, comm, dtype=dtype)
    ours = run_channel_last(link, xs[comm.rank], gys[comm.rank])
    tol = 1e-9 if dtype == numpy.float64 else 2e-4
    assert_matches_reference(ours, ref, offset, n, comm.size, tol, tol)


@everywhere
def test_channel_last_lazy_link_takes_channels_from_the_logical_shape():
    comm = MPI.COMM_WORLD
    x = numpy.random.RandomState(comm.rank).randn(2, 3, 4, 5).astype(
        numpy.float32)
    link = multinode_bn.MultiNodeBatchNormalization(None, comm,
                                                    axis=(0, 2, 3))
    link(chainer.Variable(x).as_layout(CHANNEL_LAST))
    assert link.avg_mean.shape == (3,)


@everywhere
def test_channel_last_evaluation_matches_chainer_link_on_standard_layout():
    # Chainer 7.8.1's own link cannot evaluate a channels-last input
    # (fixed_batch_normalization has no layout support); ours can.
    comm = MPI.COMM_WORLD
    x = numpy.random.RandomState(1).randn(2, 3, 4, 5).astype(numpy.float32)
    ours = multinode_bn.MultiNodeBatchNormalization(
        3, comm, initial_avg_mean=0.5, initial_avg_var=2.0)
    theirs = L.BatchNormalization(3, initial_avg_mean=0.5,
                                  initial_avg_var=2.0)
    xv = chainer.Variable(x)
    with chainer.using_config('train', False):
        y = ours(xv.as_layout(CHANNEL_LAST))
        expected = theirs(x).array
    assert y.layout == CHANNEL_LAST
    numpy.testing.assert_array_equal(y.as_layout(None).array, expected)
    F.sum(y.as_layout(None)).backward()
    assert xv.grad.shape == x.shape


# -- 2. exception type --------------------------------------------------------

@everywhere
def test_channel_mismatch_raises_chainer_invalid_type_on_every_rank():
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    channels = 4 if comm.rank == 0 else 3  # only rank 0 is wrong
    x = numpy.zeros((2, channels), numpy.float32)
    with pytest.raises(type_check.InvalidType) as info:
        link(x)
    assert isinstance(info.value, multinode_bn.InconsistentInputError)
    assert 'rank(s) 0' in str(info.value)
    assert '(2, 4)' in str(info.value)
    # Chainer's own link raises the same type for the same input.
    with pytest.raises(type_check.InvalidType):
        L.BatchNormalization(3)(numpy.zeros((2, 4), numpy.float32))


@pytest.mark.parallel(nprocs=[2, 3])
def test_channel_mismatch_after_first_call_also_raises_invalid_type():
    comm = MPI.COMM_WORLD
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    link(numpy.ones((2, 3), numpy.float32))  # signature checked once
    channels = 4 if comm.rank == comm.size - 1 else 3
    with pytest.raises(type_check.InvalidType, match='rank\\(s\\) {}'.format(
            comm.size - 1)):
        link(numpy.ones((2, channels), numpy.float32))


@pytest.mark.parallel(nprocs=[2, 3])
def test_disagreement_that_chainer_cannot_see_stays_plain_inconsistent():
    comm = MPI.COMM_WORLD
    # Each rank's input is valid on its own; they differ in dtype.
    link = multinode_bn.MultiNodeBatchNormalization(3, comm)
    dtype = numpy.float64 if comm.rank == 0 else numpy.float32
    with pytest.raises(multinode_bn.InconsistentInputError) as info:
        link(numpy.ones((2, 3), dtype))
    assert not isinstance(info.value, type_check.InvalidType)


# -- 3. the "zero tensor" warning ---------------------------------------------

def zero_tensor_warnings(record):
    return [str(w.message) for w in record
            if 'zero' in str(w.message)]


@everywhere
def test_one_element_per_rank_along_non_batch_axis_warns_only_if_global():
    comm = MPI.COMM_WORLD
    xs = [numpy.random.RandomState(r).randn(1, 3, 1).astype(numpy.float64)
          for r in range(comm.size)]
    link = multinode_bn.MultiNodeBatchNormalization(
        (1, 3), comm, axis=2, dtype=numpy.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        y = link(xs[comm.rank])
    got = zero_tensor_warnings(record)
    # The reference: Chainer's link over the elements of every rank.
    ref = L.BatchNormalization((1, 3), axis=2, dtype=numpy.float64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        expected = ref(numpy.concatenate(xs, axis=2)).array
    ok = numpy.allclose(y.array, expected[:, :, comm.rank:comm.rank + 1],
                        rtol=1e-9, atol=1e-9)
    assert all_ranks(ok)
    if comm.size == 1:
        assert len(got) == 1 and 'global batch of 1' in got[0], got
    else:
        assert all_ranks(not got), got


@everywhere
def test_global_batch_of_one_element_still_warns_on_every_rank():
    comm = MPI.COMM_WORLD
    width = 1 if comm.rank == 0 else 0
    link = multinode_bn.MultiNodeBatchNormalization((1, 3), comm, axis=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        link(numpy.ones((1, 3, width), numpy.float32))
    got = zero_tensor_warnings(record)
    assert all_ranks(len(got) == 1 and 'global batch of 1' in got[0]), got


# -- 4. Sequential with plain functions -------------------------------------

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
