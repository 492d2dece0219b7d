"""The C loops' own layer: the extension's argument checks, the choice of
the CPU statistics backend, and the package without the extension.

The arithmetic of the loops is checked against float64 NumPy with the other
statistics backends in ``test_statistics.py``.
"""

import os
import subprocess
import sys
import warnings

import numpy
import pytest

from multinode_bn import cpu_kernels

needs_loops = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason='multinode_bn._cpu_kernels was not built (no C compiler?)')


@needs_loops
def test_buffers_of_the_wrong_size_raise_instead_of_overrunning():
    native = cpu_kernels._native
    x = numpy.zeros((2, 3, 4), numpy.float32)
    out = numpy.empty((3, 3))
    with pytest.raises(ValueError, match='x holds'):
        native.local_moments(2, 3, 5, x, numpy.zeros(3), out, 4.0)
    with pytest.raises(ValueError, match='shift holds'):
        native.local_moments(2, 3, 4, x, numpy.zeros(2), out, 4.0)
    # The element type is the buffer's own: float16 is refused.
    with pytest.raises(ValueError, match="x holds .* format 'e'"):
        native.local_moments(2, 3, 4, x.astype(numpy.float16),
                             numpy.zeros(3), out, 4.0)
    with pytest.raises(ValueError, match='gx holds'):
        native.input_gradient(2, 3, 4, x, x, numpy.zeros(12, numpy.float32),
                              numpy.empty(5, numpy.float32))
    with pytest.raises(ValueError, match='shape'):
        native.normalize(-2, 3, -4, x, numpy.zeros(9, numpy.float32), x)
    with pytest.raises((ValueError, BufferError, TypeError)):
        native.local_moments(2, 3, 2, x[:, :, ::2], numpy.zeros(3), out, 4.0)


@needs_loops
def test_element_type_is_read_from_the_buffers():
    native = cpu_kernels._native
    rng = numpy.random.RandomState(0)
    for dtype in (numpy.float32, numpy.float64):
        x = rng.standard_normal((2, 3, 4)).astype(dtype)
        coef = rng.standard_normal((3, 3)).astype(dtype)
        y = numpy.empty_like(x)
        native.normalize(2, 3, 4, x, coef, y)
        c = coef.astype(numpy.float64)[:, None, :, None]
        numpy.testing.assert_allclose(y, (x - c[0]) * c[1] + c[2],
                                      rtol=1e-6, atol=1e-6)
    x = numpy.zeros((2, 3, 4), numpy.float32)
    # The batches and coefficients have the type of x ...
    with pytest.raises(ValueError, match="coef holds .* format 'd'"):
        native.normalize(2, 3, 4, x, numpy.zeros((3, 3)), numpy.empty_like(x))
    with pytest.raises(ValueError, match="gy holds .* format 'd'"):
        native.backward_sums(2, 3, 4, x, x.astype(numpy.float64),
                             numpy.zeros(3), numpy.zeros((2, 3)))
    # ... the means and sums are float64 whatever x is ...
    with pytest.raises(ValueError, match="mean holds .* format 'f'"):
        native.backward_sums(2, 3, 4, x, x, numpy.zeros(3, numpy.float32),
                             numpy.zeros((2, 3)))
    # ... and another byte order than the machine's is refused, not misread.
    swapped = x.astype(x.dtype.newbyteorder('S'))
    with pytest.raises(ValueError, match='x holds'):
        native.normalize(2, 3, 4, swapped, numpy.zeros((3, 3), x.dtype), x)
    with pytest.raises((BufferError, TypeError)):
        native.normalize(2, 3, 4, x, numpy.zeros((3, 3), x.dtype), bytes(96))


@needs_loops
def test_shapes_whose_byte_counts_overflow_are_refused():
    native = cpu_kernels._native
    out = numpy.empty((1, 3))
    with pytest.raises(ValueError, match='shape'):
        native.local_moments(2 ** 61, 1, 1, b'', numpy.zeros(1), out, 4.0)
    with pytest.raises(ValueError, match='shape'):
        native.input_gradient(1, 2 ** 62, 1, b'', b'', b'', bytearray())
    with pytest.raises(ValueError, match='shape'):
        native.normalize(2 ** 40, 2 ** 40, 2 ** 40, b'', b'', bytearray())
    # An empty batch of absurd length returns at once, its moments zeros.
    gx, moments = numpy.empty(0), numpy.ones(3)
    native.input_gradient(2 ** 59, 1, 0, gx, gx, numpy.zeros(4), gx)
    native.local_moments(2 ** 59, 1, 0, gx, numpy.zeros(1), moments, 4.0)
    assert not moments.any()


def test_extension_is_built_where_the_install_expects_it():
    # `make test` sets this: there a C compiler is present, and a failed
    # build (which pip only warns about) must not go unnoticed.
    if os.environ.get('MULTINODE_BN_EXPECT_CPU_KERNELS') != '1':
        pytest.skip('MULTINODE_BN_EXPECT_CPU_KERNELS is not set')
    assert cpu_kernels.available()


def test_backend_chosen_by_array_type_and_dtypes(monkeypatch):
    x32 = numpy.zeros((2, 3), numpy.float32)
    choose = cpu_kernels.choose_statistics
    expected = 'C loops' if cpu_kernels.available() else 'reference'
    assert choose(x32, numpy.float32).name == expected
    assert choose(x32.astype(numpy.float64), numpy.float64).name == expected
    # Mixed precision and float16 compute in another dtype: reference.
    assert choose(x32, numpy.float64).name == 'reference'
    assert choose(x32.astype(numpy.float16), numpy.float32).name == \
        'reference'
    assert choose(x32.astype(numpy.float16), numpy.float16).name == \
        'reference'
    monkeypatch.setenv('MULTINODE_BN_CPU_KERNELS', '0')
    assert choose(x32, numpy.float32).name == 'reference'



@pytest.mark.parametrize('value, loops', [
    ('0', False), ('off', False), ('false', False), (' No ', False),
    ('1', True), ('on', True), ('TRUE', True), ('yes', True), ('', True),
    (None, True)])
def test_environment_variable_switches_the_loops(monkeypatch, value, loops):
    if value is None:
        monkeypatch.delenv('MULTINODE_BN_CPU_KERNELS', raising=False)
    else:
        monkeypatch.setenv('MULTINODE_BN_CPU_KERNELS', value)
    x = numpy.zeros((2, 3), numpy.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        chosen = cpu_kernels.choose_statistics(x, numpy.float32)
    assert not [w for w in caught if 'MULTINODE_BN' in str(w.message)]
    expected = loops and cpu_kernels.available()
    assert chosen.name == ('C loops' if expected else 'reference')


def test_cupy_input_gets_the_reference_over_cupy(monkeypatch):
    # A stand-in for CuPy: only its array type matters to the choice.
    cupy = type(sys)('cupy')
    cupy.ndarray = type('ndarray', (), {'dtype': numpy.dtype('float32')})
    monkeypatch.setitem(sys.modules, 'cupy', cupy)
    chosen = cpu_kernels.choose_statistics(cupy.ndarray(), numpy.float32)
    assert chosen.name == 'reference' and chosen.xp is cupy
    chosen = cpu_kernels.choose_statistics(numpy.zeros(3), numpy.float32)
    assert chosen.xp is numpy


def test_invalid_environment_variable_is_named_and_keeps_the_loops(
        monkeypatch):
    monkeypatch.setenv('MULTINODE_BN_CPU_KERNELS', 'maybe')
    x = numpy.zeros((2, 3), numpy.float32)
    with pytest.warns(RuntimeWarning,
                      match="MULTINODE_BN_CPU_KERNELS='maybe'.*accepted"):
        chosen = cpu_kernels.choose_statistics(x, numpy.float32)
    expected = 'C loops' if cpu_kernels.available() else 'reference'
    assert chosen.name == expected


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(cpu_kernels, '_native', None)
    monkeypatch.setattr(cpu_kernels, '_warned_without_loops', [])
    monkeypatch.delenv('MULTINODE_BN_CPU_KERNELS', raising=False)
    x = numpy.zeros((2, 3), numpy.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        chosen = [cpu_kernels.choose_statistics(x, numpy.float32),
                  cpu_kernels.choose_statistics(x.astype(numpy.float64),
                                                numpy.float64),
                  # Not served by the loops anyway: nothing to say.
                  cpu_kernels.choose_statistics(x.astype(numpy.float16),
                                                numpy.float16)]
    said = [w for w in caught if 'C extension' in str(w.message)]
    assert len(said) == 1 and said[0].category is RuntimeWarning
    assert [c.name for c in chosen] == ['reference'] * 3
    assert all(c.xp is numpy for c in chosen)

WITHOUT_EXTENSION = r'''
import sys
import warnings

class _NoExtension(object):
    def find_spec(self, name, path=None, target=None):
        if name == 'multinode_bn._cpu_kernels':
            raise ImportError('not built (simulated)')
        return None

sys.meta_path.insert(0, _NoExtension())

import numpy
import chainer
import chainer.links as L
from mpi4py import MPI
import multinode_bn
from multinode_bn import cpu_kernels

assert not cpu_kernels.available()
rng = numpy.random.RandomState(0)
x = (rng.standard_normal((5, 3, 4, 4)) * 3 + 2).astype(numpy.float32)
gy = rng.standard_normal(x.shape).astype(numpy.float32)
results = []
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    for link, dtype in [
            (multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_SELF),
             numpy.float32),
            (multinode_bn.MultiNodeBatchNormalization(3, MPI.COMM_SELF),
             numpy.float32),
            (L.BatchNormalization(3, dtype=numpy.float64), numpy.float64)]:
        xv = chainer.Variable(x.astype(dtype))
        y = link(xv)
        link.cleargrads()
        y.grad = gy.astype(dtype)
        y.backward()
        results.append((y.array, xv.grad, link.gamma.grad, link.avg_var))
said = [w for w in caught if 'C extension' in str(w.message)]
assert len(said) == 1, [str(w.message) for w in caught]
for ours, ref in zip(results[0], results[2]):
    numpy.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
print('fallback ok')
'''


def test_package_works_without_the_extension_and_warns_once():
    root = os.path.normpath(os.path.join(os.path.dirname(__file__), '..'))
    environ = dict(os.environ)
    environ['PYTHONPATH'] = os.path.join(root, 'src') + os.pathsep + \
        environ.get('PYTHONPATH', '')
    proc = subprocess.run([sys.executable, '-c', WITHOUT_EXTENSION],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, env=environ, cwd=root,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip().endswith('fallback ok')
