"""Synchronized batch normalization as Chainer function nodes.

The implementation plugs into Chainer's own
:class:`chainer.functions.normalization.batch_normalization.BatchNormalization`
function node through its ``impl_selector`` hook: the selector returns an
implementation whose forward and backward compute local per-channel sums
(:mod:`multinode_bn.statistics`) and combine them across processes with one
collective each (:mod:`multinode_bn.communication`).
"""

import warnings

import numpy

import chainer
from chainer import backend
from chainer import function_node
from chainer.functions.normalization import batch_normalization as _bn
from chainer.utils import argument
import chainerx

from multinode_bn import communication
from multinode_bn import statistics
from multinode_bn import validation


def get_communication_backend(comm, communication_backend='auto'):
    """Chooses the communication backend for ``comm``.

    Args:
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm``.
        communication_backend (str): ``'mpi'``, ``'nccl'`` or ``'auto'``.
            ``'auto'`` picks ``'nccl'`` for ChainerMN's
            ``PureNcclCommunicator`` and ``'mpi'`` otherwise.

    Returns:
        str: ``'mpi'`` or ``'nccl'``.

    Raises:
        ValueError: The name is none of the three, or ``'nccl'`` was asked
            for with a communicator that has no NCCL.
    """
    return communication.select_backend(comm, communication_backend)


class _ForwardData(object):
    """What the backward needs from the forward of one call."""

    __slots__ = ('count', 'mean', 'inv_std')

    def __init__(self, count, mean, inv_std):
        self.count = count
        self.mean = mean
        self.inv_std = inv_std


class MultiNodeBNImpl(_bn.GeneralBatchNormalizationImpl):
    """Forward and backward of batch normalization over the global batch.

    Args:
        exchange: A statistics exchange from
            :func:`multinode_bn.communication.create_exchange`.
        selector (MultiNodeBNImplSelector): Owner of the per-call input
            check that travels with the statistics.
    """

    def __init__(self, exchange, selector):
        self.exchange = exchange
        self.selector = selector

    def _debug_check(self, local, stage):
        if chainer.is_debug():
            self.selector.check_finite(local, stage)

    def forward(self, axis, gamma, x, x_layout, xp, expander,
                beta, eps, decay, running_mean, running_var):
        interm_dtype = numpy.promote_types(x.dtype, gamma.dtype)
        x3 = statistics.reduced_view(x, axis)
        moments, centred, shift = statistics.local_moments(xp, x3,
                                                           interm_dtype)
        self._debug_check(moments, 'forward')
        moments = self.selector.exchange_moments(moments)

        count = moments[0, 0]
        mean = moments[:, 1]
        var = moments[:, 2] / xp.maximum(count, 1.0)
        inv_std = 1.0 / xp.sqrt(var + eps)

        y3 = statistics.normalize_into(
            xp, centred, shift, mean, inv_std,
            gamma.astype(statistics.MOMENTS_DTYPE).ravel(),
            beta.astype(statistics.MOMENTS_DTYPE).ravel())
        y = statistics.restore_shape(y3.astype(x.dtype, copy=False),
                                     x.shape, axis)

        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, count,
                            decay, gamma.shape)

        shape = gamma.shape
        forward_data = _ForwardData(count, mean, inv_std)
        return (y, x_layout, running_mean, running_var,
                mean.astype(interm_dtype).reshape(shape),
                var.astype(interm_dtype).reshape(shape),
                inv_std.astype(interm_dtype).reshape(shape), forward_data)

    def backward(self, axis, gamma, gy, x, x_layout, xp,
                 expander, mean, inv_std, eps, var, forward_data):
        interm_dtype = numpy.promote_types(x.dtype, gamma.dtype)
        x3 = statistics.reduced_view(x, axis)
        gy3 = statistics.reduced_view(gy, axis)
        sums, centred, shift = statistics.backward_sums(
            xp, gy3, x3, forward_data.mean, interm_dtype,
            inv_std=forward_data.inv_std)
        self._debug_check(sums, 'backward')
        sums = self.exchange.allreduce_sum(
            sums, lambda: self.selector.describe('backward'))

        inv_std64 = forward_data.inv_std
        a, b, c = statistics.input_gradient_coefficients(
            gamma.astype(statistics.MOMENTS_DTYPE).ravel(), inv_std64, sums,
            forward_data.count, forward_data.mean, shift)
        gx3 = statistics.input_gradient_into(xp, centred, gy3, a, b, c,
                                             x.dtype)
        gx = statistics.restore_shape(gx3, x.shape, axis)

        # Parameter gradients are the global sums divided by the number of
        # processes: after the data-parallel optimizer averages gradients
        # over processes, they carry the same 1/size scale as every other
        # parameter's gradient.
        inv_size = 1.0 / self.exchange.size
        gbeta = (sums[0] * inv_size).astype(gamma.dtype).reshape(gamma.shape)
        ggamma = (sums[1] * inv_std64 * inv_size).astype(
            gamma.dtype).reshape(gamma.shape)
        return gx, x_layout, ggamma, gbeta


def _update_running(running_mean, running_var, mean, var, count, decay,
                    shape):
    if backend.get_array_module(running_mean) is chainerx:
        running_mean, running_var = backend.from_chx(
            (running_mean, running_var))
    xp = backend.get_array_module(mean)
    # Unbiased with the global count, as one process would on the
    # concatenated batch.
    adjust = count / xp.maximum(count - 1.0, 1.0)
    if xp is numpy:
        if count == 0:
            return  # nothing was seen anywhere: keep the statistics
        keep = decay
    else:
        keep = xp.where(count > 0, decay, 1.0)
    running_mean *= keep
    running_mean += ((1 - keep) * mean).astype(
        running_mean.dtype).reshape(shape)
    running_var *= keep
    running_var += ((1 - keep) * adjust * var).astype(
        running_var.dtype).reshape(shape)


class MultiNodeBNImplSelector(object):
    """The ``impl_selector`` handed to Chainer's ``BatchNormalization``.

    It also owns what one synchronized BN remembers between calls: the
    statistics exchange, the input signatures already checked across
    processes, a label and a call count for error and stall reports.

    Args:
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm`` whose processes
            share batch statistics.
        communication_backend_name (str): ``'mpi'``, ``'nccl'`` or ``'auto'``.
    """

    def __init__(self, comm, communication_backend_name):
        backend_name = get_communication_backend(comm,
                                                 communication_backend_name)
        self.comm = comm
        self.communication_backend_name = backend_name
        self.exchange = communication.create_exchange(comm, backend_name)
        self.label = 'MultiNodeBatchNormalization'
        self.calls = 0
        # Until one header exchange has passed, processes may not even agree
        # on the size of the statistics buffer.
        self._agreed = False
        self._impl = MultiNodeBNImpl(self.exchange, self)
        self._what = ''
        self._described = {}
        self._header = None
        self._digests = (0, 0)
        self._problem = validation.OK

    def __call__(self, batch_norm_func, inputs):
        return self._impl

    def describe(self, stage='forward'):
        """What the current call is, for stall and error reports."""
        return '{} exchange of {} (call {}, {})'.format(
            stage, self.label, self.calls, self._what)

    def prepare(self, x, gamma, beta, axis):
        """Counts the call and checks the input across processes.

        The first call (and every call in debug mode) exchanges a small
        fixed-size header describing each process's input. Later calls check
        the same description inside the statistics exchange itself, at no
        extra collective. Either way a problem on any process raises the same
        :class:`~multinode_bn.validation.InconsistentInputError` on all of
        them, before anything is computed or updated.
        """
        self.calls += 1
        x_arr, g_arr, b_arr = (_array_of(v) for v in (x, gamma, beta))
        # The logical shape: a Variable in a memory layout (channels last)
        # holds its array in another axis order.
        x_shape = tuple(x.shape)
        key = (x_shape, x_arr.dtype, g_arr.shape, g_arr.dtype,
               b_arr.shape, b_arr.dtype, axis, type(x_arr), type(g_arr))
        described = self._described.get(key)
        if described is None:
            described = self._describe_input(x_shape, x_arr, g_arr, b_arr,
                                             axis)
            if len(self._described) > 64:
                self._described.clear()
            self._described[key] = described
        self._what, self._problem, self._header, self._digests = described
        if not self._agreed or chainer.is_debug():
            self._check_headers()
            self._agreed = True
        elif self._problem:
            # Take part in this call's statistics exchange all the same, so
            # that every process learns of the problem in one collective.
            xp = backend.get_array_module(g_arr)
            self.exchange_moments(xp.zeros((g_arr.size, 3),
                                           statistics.MOMENTS_DTYPE))

    def _describe_input(self, x_shape, x_arr, g_arr, b_arr, axis):
        if isinstance(axis, int):
            axis = (axis,)
        axis = tuple(_bn._compute_axis(len(x_shape), g_arr.ndim, axis))
        x_device, p_device = _device_kind(x_arr), _device_kind(g_arr)
        problem = validation.local_problem(
            x_shape, x_arr.dtype, g_arr.shape, g_arr.dtype, b_arr.dtype,
            axis, self.communication_backend_name, x_device, p_device,
            beta_shape=b_arr.shape)
        header = validation.encode_header(
            x_shape, x_arr.dtype, g_arr.shape, g_arr.dtype, axis,
            self.communication_backend_name, x_device, problem)
        digests = validation.signature_digests(
            validation.agreeing_part(header))
        what = 'x {} {}'.format(x_arr.dtype, x_shape)
        return what, problem, header, digests

    def _check_headers(self):
        headers = self.exchange.allgather_header(
            self._header, lambda: self.describe('input check'))
        validation.check_headers(headers, self.exchange.rank, self.label)

    def exchange_moments(self, moments):
        """Global moments; raises on every process if any input was bad."""
        header = validation.inband_header(self._digests, self._problem)
        merged, summed = self.exchange.allreduce_moments(
            moments, header, lambda: self.describe('forward'))
        if not validation.inband_agrees(summed):
            self._agreed = False
            self._check_headers()  # raises the detailed error
            raise validation.InconsistentInputError(
                '{} (raised on rank {}): processes fed call {} inputs that '
                'disagree.'.format(self.label, self.exchange.rank,
                                   self.calls))
        return merged

    def check_finite(self, local, stage):
        """Debug mode: every process raises if any sent non-finite values."""
        xp = backend.get_array_module(local)
        finite = bool(xp.isfinite(local).all())
        header = validation.encode_header((), numpy.float64, (),
                                          numpy.float64, (), 'mpi', 'cpu',
                                          nonfinite=not finite)
        headers = self.exchange.allgather_header(
            header, lambda: self.describe(stage + ' debug check'))
        bad = validation.nonfinite_ranks(headers)
        if bad:
            raise FloatingPointError(
                '{}: non-finite {} statistics from rank(s) {} (call {}, '
                'raised on rank {}). Check the input of those ranks.'.format(
                    self.label, stage, ', '.join(map(str, bad)), self.calls,
                    self.exchange.rank))


def _array_of(v):
    # raw_array: a Variable in a memory layout refuses ``array``.
    return v.raw_array if isinstance(v, chainer.Variable) else v


def _device_kind(a):
    if isinstance(a, numpy.ndarray):
        return 'cpu'
    if type(a).__module__.startswith('cupy'):
        return 'gpu'
    return 'other'


# Chainer's two "will always output a zero tensor" warnings judge the local
# batch only.
_ONE_SAMPLE_WARNINGS = ('A batch with no more than one sample',
                        'F.batch_normalization received a batch with single')


class MultiNodeBatchNormalizationFunction(_bn.BatchNormalization):
    """Chainer's ``BatchNormalization`` node with a synchronized backward.

    The first-order backward runs the selected implementation (one
    collective). The second-order backward differentiates a re-expression of
    the first-order backward whose reductions are themselves synchronized.
    """

    def __init__(self, impl_selector, eps=2e-5, mean=None, var=None,
                 decay=0.9, axis=None):
        super(MultiNodeBatchNormalizationFunction, self).__init__(
            eps=eps, mean=mean, var=var, decay=decay, axis=axis,
            impl_selector=impl_selector)

    def forward_chainerx(self, inputs):
        # Chainer's ChainerX kernel would normalize with local statistics
        # only; falling back converts the arrays and runs the synchronized
        # implementation instead.
        return chainer.Fallback

    def forward(self, inputs):
        with warnings.catch_warnings():
            # One local sample is fine when the global batch is larger; the
            # global count is checked after the exchange instead.
            for message in _ONE_SAMPLE_WARNINGS:
                warnings.filterwarnings('ignore', message=message)
            outputs = super(MultiNodeBatchNormalizationFunction,
                            self).forward(inputs)
        data = self.forward_data
        if (isinstance(data, _ForwardData)
                and isinstance(data.count, numpy.floating)
                and data.count <= 1):
            warnings.warn(
                'MultiNodeBatchNormalization received a global batch of {} '
                'sample(s) over all processes; the output is zero.'.format(
                    int(float(data.count))), UserWarning)
        return outputs

    def backward(self, indexes, grad_outputs):
        x, gamma = self.get_retained_inputs()
        gy, = grad_outputs
        grad = MultiNodeBatchNormalizationGrad(self)
        return grad.apply((x, gamma, gy))


class MultiNodeBatchNormalizationGrad(function_node.FunctionNode):
    """First-order gradient node; differentiable for double backward."""

    def __init__(self, forward_node):
        self.eps = forward_node.eps
        self.axis = forward_node.axis
        self.expander = forward_node.expander
        self.mean = forward_node.mean
        self.inv_std = forward_node.inv_std
        self.forward_data = forward_node.forward_data
        self._impl = forward_node._impl

    def check_layout_forward(self, inputs):
        # x and gy come in the forward input's memory layout.
        pass

    def forward(self, inputs):
        self.retain_inputs((0, 1, 2))
        x, gamma, gy = inputs
        x_layout = self.input_layouts[0]
        self.output_layouts = (x_layout, None, None)
        raw_axis = self.axis
        t = chainer.memory_layouts._get_layout_transpose_axes(
            x.ndim, None, x_layout, True)
        if t is not None:
            raw_axis = tuple(sorted(t[i] for i in self.axis))
        xp = backend.get_array_module(x)
        gx, _, ggamma, gbeta = self._impl.backward(
            raw_axis, gamma, gy, x, x_layout, xp, self.expander, self.mean,
            self.inv_std, self.eps, None, self.forward_data)
        return gx, ggamma, gbeta

    def backward(self, indexes, grad_outputs):
        x, gamma, gy = self.get_retained_inputs()
        exchange = self._impl.exchange
        with chainer.using_config('enable_backprop', True):
            outputs = differentiable_gradients(x, gamma, gy, self.axis,
                                               self.eps, exchange)
            # Zeros instead of missing gradients: every process must walk
            # the same graph, or their collectives would not pair up.
            xp = backend.get_array_module(x)
            grad_outputs = [
                chainer.Variable(xp.zeros(o.shape, o.dtype)) if g is None
                else g for o, g in zip(outputs, grad_outputs)]
            grads = chainer.grad(list(outputs), [x, gamma, gy],
                                 grad_outputs=grad_outputs,
                                 enable_double_backprop=True)
        return tuple(grads[i] for i in indexes)


class AllreduceSum(function_node.FunctionNode):
    """Differentiable sum over processes (its gradient is again a sum)."""

    def __init__(self, exchange):
        self.exchange = exchange

    def forward(self, inputs):
        a, = inputs
        summed = self.exchange.allreduce_sum(
            a.astype(statistics.MOMENTS_DTYPE))
        return backend.get_array_module(a).asarray(summed, dtype=a.dtype),

    def backward(self, indexes, grad_outputs):
        return AllreduceSum(self.exchange).apply(grad_outputs)


def _global_sum(v, axis, exchange):
    return AllreduceSum(exchange).apply((chainer.functions.sum(v, axis),))[0]


def differentiable_gradients(x, gamma, gy, axis, eps, exchange):
    """``(gx, ggamma, gbeta)`` of synchronized BN as differentiable Variables.

    Used for the second-order backward only; the first-order path computes
    the same values with fused arrays and one collective.
    """
    F = chainer.functions
    dtype = numpy.promote_types(x.dtype, gamma.dtype)
    x = F.cast(x, dtype) if x.dtype != dtype else x
    gy_c = F.cast(gy, dtype) if gy.dtype != dtype else gy
    gamma_c = F.cast(gamma, dtype) if gamma.dtype != dtype else gamma
    xp = backend.get_array_module(x)
    local_count = xp.asarray([x.size // max(gamma.size, 1)], dtype=dtype)
    count = exchange.allreduce_sum(
        local_count.astype(statistics.MOMENTS_DTYPE))
    count = float(count[0])
    inv_count = dtype.type(1.0 / max(count, 1.0))
    expander = tuple(slice(None) if i not in axis else None
                     for i in range(x.ndim))

    def bcast(v):
        return F.broadcast_to(v[expander], x.shape)

    mean = _global_sum(x, axis, exchange) * inv_count
    centred = x - bcast(mean)
    var = _global_sum(centred * centred, axis, exchange) * inv_count
    inv_std = (var + dtype.type(eps)) ** dtype.type(-0.5)
    x_hat = centred * bcast(inv_std)
    gbeta_sum = _global_sum(gy_c, axis, exchange)
    ggamma_sum = _global_sum(gy_c * x_hat, axis, exchange)
    gx = bcast(gamma_c * inv_std) * (
        gy_c - (x_hat * bcast(ggamma_sum) + bcast(gbeta_sum)) * inv_count)
    inv_size = dtype.type(1.0 / exchange.size)
    ggamma = ggamma_sum * inv_size
    gbeta = gbeta_sum * inv_size
    gx = F.cast(gx, gy.dtype) if gx.dtype != gy.dtype else gx
    if ggamma.dtype != gamma.dtype:
        ggamma = F.cast(ggamma, gamma.dtype)
        gbeta = F.cast(gbeta, gamma.dtype)
    return gx, ggamma, gbeta


def multi_node_batch_normalization(x, gamma, beta, comm, eps=2e-5,
                                   running_mean=None, running_var=None,
                                   decay=0.9, axis=None,
                                   communication_backend='auto', **kwargs):
    """Batch normalization over the batch of all processes of ``comm``.

    Mirrors :func:`chainer.functions.batch_normalization`, with statistics
    computed over the concatenation of every process's ``x``. Local batch
    sizes may differ between processes, and may be zero.

    Args:
        x (:class:`~chainer.Variable` or :ref:`ndarray`): Input.
        gamma (:class:`~chainer.Variable` or :ref:`ndarray`): Scale.
        beta (:class:`~chainer.Variable` or :ref:`ndarray`): Shift.
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm`` whose processes
            share statistics; or a :class:`MultiNodeBNImplSelector`, reused
            across calls (as the link does).
        eps (float): Added to the variance.
        running_mean (:ref:`ndarray`): Updated in place with the global
            mean, if given.
        running_var (:ref:`ndarray`): Updated in place with the global
            unbiased variance, if given.
        decay (float): Decay rate of the running averages.
        axis (int or tuple of ints): Reduced axes, as in
            :func:`chainer.functions.batch_normalization`.
        communication_backend (str): ``'mpi'``, ``'nccl'`` or ``'auto'``.

    Returns:
        ~chainer.Variable: The normalized output.

    .. admonition:: Example

        >>> from mpi4py import MPI
        >>> x = np.random.randn(4, 3).astype(np.float32)
        >>> gamma = np.ones(3, np.float32)
        >>> beta = np.zeros(3, np.float32)
        >>> y = multi_node_batch_normalization(x, gamma, beta, MPI.COMM_WORLD)
        >>> y.shape
        (4, 3)
    """
    argument.check_unexpected_kwargs(
        kwargs, train='train argument is not supported anymore. '
        'Use chainer.using_config')
    argument.assert_kwargs_empty(kwargs)
    if isinstance(comm, MultiNodeBNImplSelector):
        selector = comm
    else:
        selector = MultiNodeBNImplSelector(comm, communication_backend)
    selector.prepare(x, gamma, beta, axis)
    func = MultiNodeBatchNormalizationFunction(
        selector, eps=eps, mean=running_mean, var=running_var, decay=decay,
        axis=axis)
    return func.apply((x, gamma, beta))[0]
