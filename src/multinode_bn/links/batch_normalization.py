"""The synchronized batch normalization link."""

import copy

import chainer
from chainer import configuration
from chainer import functions
from chainer.links.normalization import batch_normalization as _bn_link
from chainer.utils import argument

from multinode_bn.functions import batch_normalization as _mnbn


class MultiNodeBatchNormalization(_bn_link.BatchNormalization):
    """Batch normalization whose statistics span every process of ``comm``.

    A drop-in replacement for :class:`chainer.links.BatchNormalization`: in
    training mode the mean and variance are those of the *global* batch,
    the concatenation of the local batches of all processes of ``comm``, so
    that tiny per-process batches normalize like one large batch. Local batch
    sizes may differ between processes, and may be zero. Evaluation mode
    uses the running statistics and needs no communication.

    It is a subclass of :class:`chainer.links.BatchNormalization`, with the
    same parameters (``gamma``, ``beta``) and persistents (``avg_mean``,
    ``avg_var``, ``N``), so checkpoints written by either load into the other.

    Args:
        size (int, tuple of ints, or None): Size (or shape) of the channel
            dimensions. If ``None``, ``axis`` is required and the size is
            taken from the first input.
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm`` (for example
            ``MPI.COMM_WORLD`` or a ``Split`` sub-communicator) whose processes
            share batch statistics. Copies of the link share it.
        decay (float): Decay rate of the running averages.
        eps (float): Added to the variance.
        dtype (numpy.dtype): Type of parameters and statistics;
            ``chainer.mixed16`` keeps them in float32.
        use_gamma (bool): If ``False``, the scale is fixed to 1.
        use_beta (bool): If ``False``, the shift is fixed to 0.
        initial_gamma: Initializer of ``gamma`` (default 1).
        initial_beta: Initializer of ``beta`` (default 0).
        communication_backend (str): ``'mpi'``, ``'nccl'`` or ``'auto'``
            (NCCL for ChainerMN's ``PureNcclCommunicator``, MPI otherwise).
        axis (int or tuple of ints): Axes reduced over, as in
            :class:`chainer.links.BatchNormalization` (keyword only).
        initial_avg_mean: Initializer of ``avg_mean`` (default 0, keyword
            only).
        initial_avg_var: Initializer of ``avg_var`` (default 1, keyword
            only).

    Attributes:
        comm: The communicator given.
        gamma (~chainer.Parameter): Scale.
        beta (~chainer.Parameter): Shift.
        avg_mean (:ref:`ndarray`): Running mean of the global batches.
        avg_var (:ref:`ndarray`): Running unbiased variance of the global
            batches.
        N (int): Number of batches seen in fine-tuning mode.

    .. admonition:: Example

        >>> from mpi4py import MPI
        >>> bn = MultiNodeBatchNormalization(3, MPI.COMM_WORLD)
        >>> x = np.random.randn(2, 3, 8, 8).astype(np.float32)
        >>> bn(x).shape
        (2, 3, 8, 8)
    """

    def __init__(self, size, comm, decay=0.9, eps=2e-5, dtype=None,
                 use_gamma=True, use_beta=True,
                 initial_gamma=None, initial_beta=None,
                 communication_backend='auto', *, axis=None,
                 initial_avg_mean=None, initial_avg_var=None):
        selector = _mnbn.MultiNodeBNImplSelector(comm, communication_backend)
        super(MultiNodeBatchNormalization, self).__init__(
            size=size, decay=decay, eps=eps, dtype=dtype,
            use_gamma=use_gamma, use_beta=use_beta,
            initial_gamma=initial_gamma, initial_beta=initial_beta,
            axis=axis, initial_avg_mean=initial_avg_mean,
            initial_avg_var=initial_avg_var)
        self.comm = comm
        self._impl_selector = selector

    @property
    def label(self):
        """How error and stall reports name this link: its path in the
        model after :func:`~multinode_bn.create_mnbn_model`, otherwise its
        name in its parent and the order of its first synchronized call."""
        return self._impl_selector.protocol.label

    @label.setter
    def label(self, value):
        self._impl_selector.protocol.label = value

    @property
    def communication_backend(self):
        """The backend in use: ``'mpi'`` or ``'nccl'``."""
        return self._impl_selector.communication_backend_name

    def __deepcopy__(self, memo):
        # The communicator (and the exchange built on it) is shared by
        # copies; everything else, call counts included, is copied.
        memo[id(self.comm)] = self.comm
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def forward(self, x, **kwargs):
        """forward(self, x, finetune=False)

        Normalizes ``x`` with the statistics of the global batch (training)
        or the running statistics (evaluation).

        Args:
            x (~chainer.Variable): Input.
            finetune (bool): In training mode, accumulate the plain average
                of the global batch statistics (decay ``1 - 1/N``) instead of
                the moving average.

        Returns:
            ~chainer.Variable: Output of the same shape as ``x``.
        """
        finetune, = argument.parse_kwargs(
            kwargs, ('finetune', False),
            test='test argument is not supported anymore. '
                 'Use chainer.using_config')
        if self.avg_mean is None:
            # Lazy size: parameters from the first input, undone if the
            # call fails (on every process alike), so that a corrected
            # input can initialize them again.
            pending = (self._initial_avg_mean, self._initial_avg_var)
            self._initialize_params(tuple(
                d for i, d in enumerate(x.shape) if i not in self.axis))
            try:
                return self._forward(x, finetune)
            except Exception:
                self.avg_mean = self.avg_var = None
                self._initial_avg_mean, self._initial_avg_var = pending
                for param in (self.gamma, self.beta):
                    if param is not None:
                        param.array = None
                raise
        return self._forward(x, finetune)

    def _forward(self, x, finetune):
        gamma = self.gamma
        if gamma is None:
            gamma, = self._get_gamma()
        beta = self.beta
        if beta is None:
            beta, = self._get_beta()

        if not configuration.config.train:
            layout = getattr(x, 'layout', None)
            if layout is not None:
                # Chainer's fixed_batch_normalization takes the standard
                # layout only: normalize a transposed view, hand the result
                # back in the input's layout.
                return functions.fixed_batch_normalization(
                    x.as_layout(None), gamma, beta, self.avg_mean,
                    self.avg_var, self.eps, axis=self.axis).as_layout(layout)
            return functions.fixed_batch_normalization(
                x, gamma, beta, self.avg_mean, self.avg_var, self.eps,
                axis=self.axis)

        avg_mean, avg_var = self.avg_mean, self.avg_var
        if chainer.config.in_recomputing:
            # A recomputed forward must not count twice.
            avg_mean = avg_var = None
            decay = self.decay
        elif finetune:
            decay = 1. - 1. / (self.N + 1)
        else:
            decay = self.decay
        y = _mnbn.synchronized_batch_normalization(
            self._impl_selector, x, gamma, beta, self.eps, avg_mean,
            avg_var, decay, self.axis, link_config=(
                ('use_gamma', self.gamma is not None),
                ('use_beta', self.beta is not None),
                ('finetune', bool(finetune))), name=self.name)
        if finetune and not chainer.config.in_recomputing:
            # Counted only once the call has succeeded, so a failed call
            # leaves every persistent as it was.
            self.N += 1
        return y

