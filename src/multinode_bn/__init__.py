"""Synchronized batch normalization for Chainer across MPI processes."""

from multinode_bn.functions import multi_node_batch_normalization  # NOQA
from multinode_bn.links import create_mnbn_model  # NOQA
from multinode_bn.links import MultiNodeBatchNormalization  # NOQA
from multinode_bn.links import revert_mnbn_model  # NOQA

__version__ = '0.1.0'
