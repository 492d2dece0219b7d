"""Synchronized batch normalization as Chainer function nodes: Chainer's
own ``BatchNormalization`` node with an ``impl_selector`` whose sums span
the processes, its gradient node, and the functional API."""

import collections
import warnings

import numpy

import chainer
from chainer import backend
from chainer import function_node
from chainer.functions.normalization import batch_normalization as _bn
from chainer.utils import argument
import chainerx

from multinode_bn import communication
from multinode_bn import cpu_kernels
from multinode_bn import protocol
from multinode_bn import statistics


#: ChainerMN's name of :func:`multinode_bn.communication.select_backend`.
get_communication_backend = communication.select_backend


class MultiNodeBNImplSelector(object):
    """The ``impl_selector`` handed to Chainer's ``BatchNormalization``:
    holds the link's :class:`~multinode_bn.protocol.LinkProtocol`.

    Args:
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm``.
        communication_backend_name (str): ``'mpi'``, ``'nccl'`` or ``'auto'``.
    """

    def __init__(self, comm, communication_backend_name):
        self.communication_backend_name = get_communication_backend(
            comm, communication_backend_name)
        self.protocol = protocol.LinkProtocol(
            comm, self.communication_backend_name)

    def __call__(self, batch_norm_func, inputs):
        return MultiNodeBNImpl(self.protocol, batch_norm_func.call)


# What the backward needs from the forward (``mean``, ``inv_std``: float64).
_ForwardData = collections.namedtuple(
    '_ForwardData', 'count mean inv_std statistics call')


def _nonfinite(local):
    """Debug mode: whether this process's statistics are not finite."""
    if not chainer.is_debug():
        return False
    return not bool(backend.get_array_module(local).isfinite(local).all())


class MultiNodeBNImpl(_bn.GeneralBatchNormalizationImpl):
    """Forward and backward over the global batch, for ``call`` of a link's
    :class:`~multinode_bn.protocol.LinkProtocol`."""

    def __init__(self, link_protocol, call):
        self.protocol, self.call = link_protocol, call

    def forward(self, axis, gamma, x, x_layout, xp, expander,
                beta, eps, decay, running_mean, running_var):
        interm_dtype = numpy.promote_types(x.dtype, gamma.dtype)
        stats = cpu_kernels.choose_statistics(x, interm_dtype)
        layout = statistics.Layout.of(x, axis)
        x3 = layout.view(x)
        moments = stats.local_moments(x3)
        moments, count = self.protocol.exchange_moments(
            self.call, moments, x3.shape[0] * x3.shape[2], eps,
            _nonfinite(moments))
        mean = moments[:, 1]
        var = moments[:, 2] / max(count, 1.0)
        inv_std = 1.0 / xp.sqrt(var + eps)

        gamma64 = gamma.astype(statistics.MOMENTS_DTYPE).ravel()
        y = layout.restore(stats.normalize(
            x3, mean, gamma64 * inv_std,
            beta.astype(statistics.MOMENTS_DTYPE).ravel(), x.dtype))
        if running_mean is not None and count > 0:
            _update_running(running_mean, running_var, mean, var, count,
                            decay)
        shape = gamma.shape
        return (y, x_layout, running_mean, running_var,
                mean.astype(interm_dtype).reshape(shape),
                var.astype(interm_dtype).reshape(shape),
                inv_std.astype(interm_dtype).reshape(shape),
                _ForwardData(count, mean, inv_std, stats, self.call))

    def backward(self, axis, gamma, gy, x, x_layout, xp,
                 expander, mean, inv_std, eps, var, forward_data):
        stats = forward_data.statistics
        layout = statistics.Layout.of(x, axis)
        x3, gy3 = layout.view(x), layout.view(gy)
        mean64, inv_std64 = forward_data.mean, forward_data.inv_std
        sums = stats.backward_sums(x3, gy3, mean64)  # zeros if empty
        sums = self.protocol.exchange_sums(
            forward_data.call, 'backward', sums, _nonfinite(sums))

        gamma64 = gamma.astype(statistics.MOMENTS_DTYPE).ravel()
        p, q, r = statistics.gradient_coefficients(
            gamma64, inv_std64, sums, forward_data.count)
        gx = layout.restore(
            stats.input_gradient(x3, gy3, mean64, p, q, r, x.dtype))
        # Global sums / processes: the optimizer's average over processes
        # then gives them the scale of every other parameter's gradient.
        inv_size = 1.0 / self.protocol.exchange.size
        gbeta = (sums[0] * inv_size).astype(gamma.dtype).reshape(gamma.shape)
        ggamma = (sums[1] * inv_std64 * inv_size).astype(
            gamma.dtype).reshape(gamma.shape)
        return gx, x_layout, ggamma, gbeta


def _update_running(running_mean, running_var, mean, var, count, decay):
    if backend.get_array_module(running_mean) is chainerx:
        running_mean, running_var = backend.from_chx(
            (running_mean, running_var))
    # Unbiased with the global count, as on the concatenated batch.
    unbiased = var * (count / max(count - 1.0, 1.0))
    for running, value in ((running_mean, mean), (running_var, unbiased)):
        running *= decay
        running += ((1 - decay) * value).astype(running.dtype).reshape(
            running.shape)


class MultiNodeBatchNormalizationFunction(_bn.BatchNormalization):
    """Chainer's ``BatchNormalization`` node with a synchronized backward.

    Args:
        impl_selector (MultiNodeBNImplSelector): The link's selector.
        eps, mean, var, decay, axis: As for Chainer's node.
        call (~multinode_bn.protocol.Call): The call, if already begun.
    """

    def __init__(self, impl_selector, eps=2e-5, mean=None, var=None,
                 decay=0.9, axis=None, call=None):
        # Chainer's constructor refuses an eps below cuDNN's minimum
        # whenever cuDNN is available; this node never uses cuDNN.
        with chainer.using_config('use_cudnn', 'never'):
            super().__init__(eps=eps, mean=mean, var=var, decay=decay,
                             axis=axis, impl_selector=impl_selector)
        self.call = call

    def forward_chainerx(self, inputs):
        return chainer.Fallback  # ChainerX would use local statistics

    def forward(self, inputs):
        if self.call is None:
            x, gamma, beta = inputs
            self.call = self._impl_selector.protocol.begin_call(
                x, gamma, beta, self.axis, _config(self.eps, self.decay),
                running=(self.running_mean, self.running_var))
        with warnings.catch_warnings():
            # Chainer's one-sample warnings see the local batch; the global
            # count is checked after the exchange instead.
            warnings.filterwarnings('ignore', 'A batch with no more than one '
                                    'sample|F.batch_normalization received')
            outputs = super().forward(inputs)
        if self.forward_data.count <= 1:
            warnings.warn(
                'MultiNodeBatchNormalization received a global batch of {} '
                'sample(s) over all processes; the output is zero.'.format(
                    int(self.forward_data.count)), UserWarning)
        return outputs

    def backward(self, indexes, grad_outputs):
        x, gamma = self.get_retained_inputs()
        return MultiNodeBatchNormalizationGrad(self).apply(
            (x, gamma, grad_outputs[0]))


class MultiNodeBatchNormalizationGrad(function_node.FunctionNode):
    """First-order gradient node, with a synchronized backward."""

    def __init__(self, forward_node):
        self.axis, self.eps = forward_node.axis, forward_node.eps
        self.expander = forward_node.expander
        self.mean, self.inv_std = forward_node.mean, forward_node.inv_std
        self.forward_data = forward_node.forward_data
        self._impl = forward_node._impl

    def check_layout_forward(self, inputs):
        pass  # x and gy come in the forward input's memory layout

    def forward(self, inputs):
        self.retain_inputs((0, 1, 2))
        self.retain_outputs((1, 2))
        x, gamma, gy = inputs
        x_layout = self.input_layouts[0]
        self.output_layouts = (x_layout, None, None)
        raw_axis = self.axis
        t = chainer.memory_layouts._get_layout_transpose_axes(
            x.ndim, None, x_layout, True)
        if t is not None:
            raw_axis = tuple(sorted(t[i] for i in self.axis))
        gx, _, ggamma, gbeta = self._impl.backward(
            raw_axis, gamma, gy, x, x_layout, backend.get_array_module(x),
            self.expander, self.mean, self.inv_std, self.eps, None,
            self.forward_data)
        return gx, ggamma, gbeta

    def backward(self, indexes, grad_outputs):
        """Second order in closed form from this node's own inputs and
        outputs: Chainer's ``BatchNormalizationGrad.backward`` with global
        reductions (derived in docs/design.md)."""
        F = chainer.functions
        x, gamma, gy = self.get_retained_inputs()
        g_gamma, g_beta = self.get_retained_outputs()  # global sums / P
        ggx, gggamma, ggbeta = grad_outputs
        xp = backend.get_array_module(x)
        size = self._impl.protocol.exchange.size
        dtype = numpy.promote_types(
            numpy.promote_types(x.dtype, gamma.dtype), numpy.float32)

        def cast(v, like):  # zeros for a missing gradient
            if v is None:
                return chainer.Variable(xp.zeros(like.shape, dtype))
            return v if v.dtype == dtype else F.cast(v, dtype)

        def bcast(v):
            return F.broadcast_to(v[self.expander], x.shape)

        data = self.forward_data
        inv_m = dtype.type(1.0 / max(data.count, 1.0))
        inv_p = dtype.type(1.0 / size)
        s = data.inv_std.astype(dtype).reshape(gamma.shape)
        mean = data.mean.astype(dtype).reshape(gamma.shape)
        gamma, gy, a = cast(gamma, gamma), cast(gy, gy), cast(ggx, x)
        g_gamma = cast(g_gamma, g_gamma) * dtype.type(size)
        g_beta = cast(g_beta, g_beta) * dtype.type(size)
        x_hat = (cast(x, x) - bcast(mean)) * bcast(s)
        # The same exchange on every process, zeros for a missing gradient.
        sums = AllreduceSum(self._impl.protocol, data.call).apply((F.stack([
            F.sum(a * x_hat, axis=self.axis), F.sum(a, axis=self.axis),
            F.sum(a * gy, axis=self.axis), cast(gggamma, gamma),
            cast(ggbeta, gamma)]),))[0]
        sum_a_xhat, sum_a, sum_a_gy, up_gamma, up_beta = F.separate(sums, 0)

        coeff_m = gamma * s * inv_m
        u = up_gamma * inv_p - coeff_m * sum_a_xhat
        v = up_beta * inv_p - coeff_m * sum_a
        r_over_gamma = s * (sum_a_gy - (g_gamma * sum_a_xhat
                                        + g_beta * sum_a) * inv_m)
        c2 = coeff_m * g_gamma
        d_std = -s * (gamma * r_over_gamma + u * g_gamma - c2 * sum_a_xhat)
        d_mean = -s * (u * g_beta - c2 * sum_a)
        gx2 = bcast(s) * (bcast(u) * gy - bcast(c2) * a) + inv_m * (
            bcast(d_mean) + x_hat * bcast(d_std))
        ggy2 = bcast(u) * x_hat + bcast(v) + bcast(gamma * s) * a
        grads = (gx2, r_over_gamma * inv_p, ggy2)
        targets = self.get_retained_inputs()
        return tuple(grads[i] if grads[i].dtype == targets[i].dtype
                     else F.cast(grads[i], targets[i].dtype) for i in indexes)


class AllreduceSum(function_node.FunctionNode):
    """Differentiable sum over processes (its gradient is again a sum), in
    ``double backward`` exchanges of ``call`` of a link's protocol."""

    def __init__(self, link_protocol, call):
        self.protocol, self.call = link_protocol, call

    def forward(self, inputs):
        a, = inputs
        summed = self.protocol.exchange_pieces(
            self.call, a.astype(statistics.MOMENTS_DTYPE).ravel())
        return summed.reshape(a.shape).astype(a.dtype, copy=False),

    def backward(self, indexes, grad_outputs):
        return AllreduceSum(self.protocol, self.call).apply(grad_outputs)


def _config(eps, decay):
    """What every process must share of a call's arguments."""
    return (('eps', None if eps is None else float(eps)),
            ('decay', None if decay is None else float(decay)))


def synchronized_batch_normalization(selector, x, gamma, beta, eps,
                                     running_mean, running_var, decay, axis,
                                     link_config=(), name=None):
    """Begins a call of ``selector``'s link and applies the node; the link
    adds its ``name`` and ``link_config``, ``(name, value)`` pairs."""
    call = selector.protocol.begin_call(
        x, gamma, beta, axis, _config(eps, decay) + tuple(link_config),
        running=(running_mean, running_var), name=name)
    func = MultiNodeBatchNormalizationFunction(
        selector, eps=eps, mean=running_mean, var=running_var, decay=decay,
        axis=axis, call=call)
    return func.apply((x, gamma, beta))[0]


def multi_node_batch_normalization(x, gamma, beta, comm, eps=2e-5,
                                   running_mean=None, running_var=None,
                                   decay=0.9, axis=None,
                                   communication_backend='auto', **kwargs):
    """:func:`chainer.functions.batch_normalization` over the batches of all
    processes of ``comm`` together (of any sizes, even empty).

    Args:
        x, gamma, beta: Input, scale and shift (Variables or arrays).
        comm: ChainerMN communicator or ``mpi4py.MPI.Comm``; or a
            :class:`MultiNodeBNImplSelector`, reused across calls.
        eps, running_mean, running_var, decay, axis: As for
            :func:`chainer.functions.batch_normalization`; the running
            statistics get the global mean and unbiased variance.
        communication_backend (str): ``'mpi'``, ``'nccl'`` or ``'auto'``.

    Returns:
        ~chainer.Variable: The normalized output.
    """
    argument.check_unexpected_kwargs(
        kwargs, train='train argument is not supported anymore. '
        'Use chainer.using_config')
    argument.assert_kwargs_empty(kwargs)
    if isinstance(comm, MultiNodeBNImplSelector):
        selector = comm
    else:
        selector = MultiNodeBNImplSelector(comm, communication_backend)
    return synchronized_batch_normalization(
        selector, x, gamma, beta, eps, running_mean, running_var, decay, axis)
