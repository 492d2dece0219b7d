"""Property-based fuzzing against a float64 reference on the global batch.

Every rank draws the same examples (derandomized, no shrinking) and every
check is collective, so a failure on one rank fails all of them together
instead of leaving the others waiting in a collective.
"""

import warnings

import numpy
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import chainer
import chainer.functions as F
from mpi4py import MPI

import multinode_bn

AXES = {
    2: [None, (0,)],
    3: [None, (0, 2), (0, 1)],
    4: [None, (0, 2, 3), (0, 1, 2), (0, 2)],
}
TOL = {numpy.float64: 1e-7, numpy.float32: 2e-3, numpy.float16: 3e-2}


@st.composite
def cases(draw, ranks):
    ndim = draw(st.sampled_from(sorted(AXES)))
    axis = draw(st.sampled_from(AXES[ndim]))
    tail = tuple(draw(st.integers(1, 4)) for _ in range(ndim - 1))
    kind = draw(st.sampled_from(['zeros', 'one-rank', 'random']))
    if kind == 'one-rank':  # all ranks but one empty
        sizes = [0] * ranks
        sizes[draw(st.integers(0, ranks - 1))] = draw(st.integers(1, 5))
    else:
        low = 0 if kind == 'zeros' else 1
        sizes = [draw(st.integers(low, 5)) for _ in range(ranks)]
        if sum(sizes) == 0:
            sizes[0] = 2
    dtype = draw(st.sampled_from([numpy.float32, numpy.float64,
                                  numpy.float16]))
    if dtype == numpy.float16:
        scale = 10.0 ** draw(st.floats(-1, 2))
        offset = scale * draw(st.floats(-4, 4))
    else:
        scale = 10.0 ** draw(st.floats(-3, 4))
        offset = draw(st.floats(-1e4, 1e4))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return dict(axis=axis, tail=tail, sizes=sizes, dtype=dtype, scale=scale,
                offset=offset, seed=seed)


def _reference(x, gy, gamma, beta, axis):
    mean, var = numpy.zeros(gamma.shape), numpy.ones(gamma.shape)
    xv = chainer.Variable(x)
    y = F.batch_normalization(xv, gamma, beta, running_mean=mean,
                              running_var=var, decay=0.5, axis=axis)
    y.grad = gy
    y.backward()
    return y.array, xv.grad, mean, var


def _relative_error(ours, ref):
    ours = numpy.asarray(ours, numpy.float64)
    if ref.size == 0:
        return 0.0
    return float(numpy.abs(ours - ref).max() / max(1.0, numpy.abs(ref).max()))


def check_case(comm, case):
    rank, dtype = comm.rank, case['dtype']
    rng = numpy.random.RandomState(case['seed'])
    xs = [(case['offset'] + case['scale'] * rng.standard_normal(
        (n,) + case['tail'])).astype(dtype) for n in case['sizes']]
    gys = [rng.standard_normal((n,) + case['tail']).astype(dtype)
           for n in case['sizes']]
    ndim = len(case['tail']) + 1
    axis = case['axis'] if case['axis'] is not None else (0,) + tuple(
        range(2, ndim))
    pshape = tuple(d for i, d in enumerate((1,) + case['tail'])
                   if i not in axis)
    gamma = 0.5 + rng.rand(*pshape)
    beta = rng.randn(*pshape)
    x64 = numpy.concatenate(xs).astype(numpy.float64)
    gy64 = numpy.concatenate(gys).astype(numpy.float64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        y_ref, gx_ref, mean_ref, var_ref = _reference(
            x64, gy64, gamma, beta, case['axis'])

    param_dtype = numpy.float32 if dtype == numpy.float16 else dtype
    mean = numpy.zeros(pshape, param_dtype)
    var = numpy.ones(pshape, param_dtype)
    xv = chainer.Variable(xs[rank])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        y = multinode_bn.multi_node_batch_normalization(
            xv, gamma.astype(param_dtype), beta.astype(param_dtype), comm,
            running_mean=mean, running_var=var, decay=0.5, axis=case['axis'])
        y.grad = gys[rank]
        y.backward()
    start = sum(case['sizes'][:rank])
    mine = slice(start, start + case['sizes'][rank])
    errors = {
        'y': _relative_error(y.array, y_ref[mine]),
        'gx': _relative_error(xv.grad, gx_ref[mine]),
        'running_mean': _relative_error(mean / max(1.0, abs(case['offset'])),
                                        mean_ref / max(1.0,
                                                       abs(case['offset']))),
        'running_var': float(numpy.abs(var / var_ref - 1).max()),
    }
    worst = max(errors.values())
    ok = bool(worst <= TOL[dtype] and numpy.isfinite(worst))
    all_ok = comm.allreduce(ok, op=MPI.LAND)
    assert all_ok, 'rank {}: {} errors {} (tolerance {})'.format(
        rank, case, errors, TOL[dtype])


FUZZ = settings(max_examples=40, derandomize=True, database=None,
                deadline=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))


@pytest.mark.parallel(nprocs=[2, 3])
@FUZZ
@given(data=st.data())
def test_fuzzed_inputs_match_float64_reference_on_global_batch(data):
    comm = MPI.COMM_WORLD
    check_case(comm, data.draw(cases(comm.size)))


@settings(max_examples=80, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_inputs_single_process(data):
    check_case(MPI.COMM_SELF, data.draw(cases(1)))
