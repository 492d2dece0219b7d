"""Random control-flow divergences between processes: each run either
equals the float64 reference (no process diverged) or raises on every
process, an InconsistentInputError or a StallError whose report names the
link; none hangs without a report."""

import numpy
import pytest

import chainer
import chainer.functions as F
from mpi4py import MPI

import multinode_bn
from multinode_bn.validation import InconsistentInputError
from conftest import assert_matches_reference, reference, split_sizes
from test_control_flow import stall_raises

CHANNELS = {'a': 3, 'b': 3, 'c': 4}
MUTATIONS = ['skip a call', 'swap two links', 'extra call',
             'another link', 'skip the backward', 'extra backward']


def _scenario(seed, size):
    """The mutation and the processes it applies to (the same on every
    process): none for every fourth seed, else a non-empty proper subset."""
    rng = numpy.random.RandomState(seed)
    if seed % 4 == 0:
        return None, set()
    mutation = MUTATIONS[rng.randint(len(MUTATIONS))]
    count = rng.randint(1, size)
    return mutation, set(rng.choice(size, count, replace=False).tolist())


def _run(links, inputs, mutation, rng):
    order = ['a', 'b', 'c']
    if mutation == 'skip a call':
        order.remove(order[rng.randint(3)])
    elif mutation == 'swap two links':
        i = rng.randint(2)
        order[i], order[i + 1] = order[i + 1], order[i]
    elif mutation == 'extra call':
        order.insert(rng.randint(3), order[rng.randint(3)])
    elif mutation == 'another link':
        order[1] = 'a'
    outputs = {}
    for name in order:
        xv = chainer.Variable(inputs[name][0])
        outputs[name] = (xv, links[name](xv))
    loss = sum(F.sum(y * inputs[name][1]) for name, (_, y) in
               outputs.items())
    for link in links.values():
        link.cleargrads()
    if mutation != 'skip the backward':
        loss.backward()
    if mutation == 'extra backward':
        loss.backward()
    # The next iteration begins: every process calls this link.
    links['end'](inputs['end'][0])
    return {name: (y.array, xv.grad) for name, (xv, y) in outputs.items()}


@pytest.mark.parallel(nprocs=[2, 3])
@pytest.mark.parametrize('seed', range(24))
def test_divergent_control_flow_raises_everywhere_or_matches_reference(
        seed):
    # A communicator of the scenario's own: a process stalled while making
    # a link's communicator leaves that collective pending on it.
    comm = MPI.COMM_WORLD.Dup()
    mutation, mutated = _scenario(seed, comm.size)
    sizes = [2 + (seed + r) % 3 for r in range(comm.size)]
    data = numpy.random.RandomState(seed)
    batches = {name: [(data.standard_normal((n, c)) * 2 + 1,
                       data.standard_normal((n, c))) for n in sizes]
               for name, c in dict(CHANNELS, end=2).items()}
    links = {}
    for name in ('a', 'b', 'c', 'end'):
        links[name] = multinode_bn.MultiNodeBatchNormalization(
            (dict(CHANNELS, end=2))[name], comm, dtype=numpy.float64)
        links[name].label = '/' + name
    inputs = {name: batches[name][comm.rank] for name in batches}
    rng = numpy.random.RandomState(1000 + seed + comm.rank)
    # A short timeout where a stall is expected; a generous one where none
    # is, so that a slow machine cannot fail the control runs.
    with stall_raises(1.0 if mutated else 30.0) as policy:
        try:
            results = _run(links, inputs,
                           mutation if comm.rank in mutated else None, rng)
            outcome = 'ok'
        except InconsistentInputError as e:
            outcome, message = 'inconsistent', str(e)
        except multinode_bn.StallError as e:
            outcome, message = 'stall', str(e)
    everyone = comm.allgather(outcome)
    if not mutated:
        assert set(everyone) == {'ok'}, everyone
        offset, n = split_sizes(sizes, comm.rank)
        for name in ('a', 'b', 'c'):
            xs = [x for x, _ in batches[name]]
            gys = [g for _, g in batches[name]]
            ref = reference(xs, gys, CHANNELS[name])
            y, gx = results[name]
            ours = type(ref)(y, gx, None, None, links[name].avg_mean,
                             links[name].avg_var)
            assert_matches_reference(ours, ref, offset, n, comm.size, 1e-9,
                                     1e-9, params=False)
        return
    # Someone diverged: every process raises, none goes on silently.
    assert 'ok' not in everyone, (mutation, mutated, everyone)
    if outcome == 'stall':
        assert "/" in message and 'call' in message
        assert 'waited' in policy.stream.getvalue()
