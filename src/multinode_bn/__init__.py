"""Synchronized batch normalization for Chainer across MPI processes."""

#: The package's version; every process of a job must run the same one
#: (the first exchange of each link checks it).
__version__ = '0.1.0'

from multinode_bn.communication import get_stall_policy  # NOQA
from multinode_bn.communication import set_stall_policy  # NOQA
from multinode_bn.communication import StallError  # NOQA
from multinode_bn.extensions import PopulationStatistics  # NOQA
from multinode_bn.functions import multi_node_batch_normalization  # NOQA
from multinode_bn.links import create_mnbn_model  # NOQA
from multinode_bn.links import MultiNodeBatchNormalization  # NOQA
from multinode_bn.links import revert_mnbn_model  # NOQA
from multinode_bn.population import update_population_statistics  # NOQA
from multinode_bn.validation import InconsistentInputError  # NOQA
from multinode_bn.validation import InvalidInputTypeError  # NOQA
