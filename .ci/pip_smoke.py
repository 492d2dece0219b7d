"""Smoke test of an installed multinode_bn, run under ``mpiexec -n 2``.

Each rank normalizes its own batch of a different size; the output must be
the slice of a batch normalization of the concatenated batch, computed here
with NumPy in float64.
"""
import sys

import numpy as np
from mpi4py import MPI

import multinode_bn

comm = MPI.COMM_WORLD
sizes = [3 + r for r in range(comm.size)]
rng = np.random.RandomState(0)
xs = [rng.standard_normal((n, 4, 5)).astype(np.float32) * 3 + 1
      for n in sizes]

bn = multinode_bn.MultiNodeBatchNormalization(4, comm)
y = bn(xs[comm.rank]).array

whole = np.concatenate(xs).astype(np.float64)
mean = whole.mean(axis=(0, 2), keepdims=True)
var = whole.var(axis=(0, 2), keepdims=True)
expected = ((whole - mean) / np.sqrt(var + bn.eps))[
    sum(sizes[:comm.rank]):sum(sizes[:comm.rank + 1])]
error = float(np.abs(y - expected).max())
# The installed copy, not the source tree.
installed = 'site-packages' in multinode_bn.__file__
ok = comm.allreduce(error < 1e-4 and installed, op=MPI.LAND)
print('rank {} of {}: multinode_bn {} from {}, max error {:.1e} against '
      'the global batch: {}'.format(comm.rank, comm.size,
                                    multinode_bn.__version__,
                                    multinode_bn.__file__, error,
                                    'ok' if ok else 'FAILED'), flush=True)
sys.exit(0 if ok else 1)
