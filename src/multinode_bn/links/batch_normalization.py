"""The synchronized batch normalization link."""

import copy

import chainer
from chainer import functions
from chainer.links.normalization import batch_normalization as _bn_link
from chainer.utils import argument

from multinode_bn.functions import batch_normalization as _mnbn


class MultiNodeBatchNormalization(_bn_link.BatchNormalization):
    """Batch normalization whose statistics span every process of ``comm``.

    A drop-in :class:`chainer.links.BatchNormalization` whose training mode
    normalizes with the statistics of the local batches of all processes
    together (of any sizes, even empty). Evaluation mode does not communicate.

    Args:
        size (int, tuple of ints, or None): Channel size or shape; ``None``
            takes it from the first input (``axis`` required).
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm``; copies share it.
        decay (float): Decay rate of the running averages.
        eps (float): Added to the variance.
        dtype (numpy.dtype): Type of parameters and statistics.
        use_gamma (bool): If ``False``, the scale is fixed to 1.
        use_beta (bool): If ``False``, the shift is fixed to 0.
        initial_gamma: Initializer of ``gamma`` (default 1).
        initial_beta: Initializer of ``beta`` (default 0).
        communication_backend (str): ``'mpi'``, ``'nccl'`` or ``'auto'``
            (NCCL for ChainerMN's ``PureNcclCommunicator``, MPI otherwise).
        axis (int or tuple of ints): Axes reduced over (keyword only).
        initial_avg_mean: Initializer of ``avg_mean`` (default 0).
        initial_avg_var: Initializer of ``avg_var`` (default 1).
    """

    def __init__(self, size, comm, decay=0.9, eps=2e-5, dtype=None,
                 use_gamma=True, use_beta=True, initial_gamma=None,
                 initial_beta=None, communication_backend='auto', *,
                 axis=None, initial_avg_mean=None, initial_avg_var=None):
        selector = _mnbn.MultiNodeBNImplSelector(comm, communication_backend)
        super().__init__(
            size, decay, eps, dtype, use_gamma, use_beta, initial_gamma,
            initial_beta, axis=axis, initial_avg_mean=initial_avg_mean,
            initial_avg_var=initial_avg_var)
        self.comm = comm
        self._impl_selector = selector

    @property
    def label(self):
        """The link's name in error and stall reports (its model path)."""
        return self._impl_selector.protocol.label

    @label.setter
    def label(self, value):
        self._impl_selector.protocol.label = value

    @property
    def communication_backend(self):
        """The backend in use: ``'mpi'`` or ``'nccl'``."""
        return self._impl_selector.communication_backend_name

    def __deepcopy__(self, memo):
        # Copies share the communicator; all else (call counts too) is copied.
        memo[id(self.comm)] = self.comm
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def forward(self, x, **kwargs):
        """forward(self, x, finetune=False)

        Normalizes ``x`` (training mode: with the global batch statistics;
        ``finetune``: accumulating their plain average, not a moving one).
        """
        finetune, = argument.parse_kwargs(
            kwargs, ('finetune', False),
            test='test argument is not supported anymore. '
                 'Use chainer.using_config')
        if self.avg_mean is not None:
            return self._forward(x, finetune)
        # Lazy size, undone when the first call fails (on every rank alike).
        pending = (self._initial_avg_mean, self._initial_avg_var)
        self._initialize_params(tuple(
            d for i, d in enumerate(x.shape) if i not in self.axis))
        try:
            return self._forward(x, finetune)
        except Exception:
            self.avg_mean = self.avg_var = None
            self._initial_avg_mean, self._initial_avg_var = pending
            for param in self.params():
                param.array = None
            raise

    def _forward(self, x, finetune):
        gamma = self.gamma if self.gamma is not None else self._get_gamma()[0]
        beta = self.beta if self.beta is not None else self._get_beta()[0]
        if not chainer.config.train:
            # fixed_batch_normalization takes the standard layout only.
            x = chainer.as_variable(x)
            y = functions.fixed_batch_normalization(
                x.as_layout(None), gamma, beta, self.avg_mean, self.avg_var,
                self.eps, axis=self.axis)
            return y.as_layout(x.layout)

        avg_mean, avg_var, decay = self.avg_mean, self.avg_var, self.decay
        if chainer.config.in_recomputing:
            avg_mean = avg_var = None  # a recomputed forward counts once
        elif finetune:
            decay = 1. - 1. / (self.N + 1)
        y = _mnbn.synchronized_batch_normalization(
            self._impl_selector, x, gamma, beta, self.eps, avg_mean,
            avg_var, decay, self.axis, link_config=(
                ('use_gamma', self.gamma is not None),
                ('use_beta', self.beta is not None),
                ('finetune', bool(finetune))), name=self.name)
        if finetune and not chainer.config.in_recomputing:
            self.N += 1  # after success only: a failed call changes nothing
        return y
