"""Synchronized batch normalization as Chainer function nodes.

The implementation plugs into Chainer's own
:class:`chainer.functions.normalization.batch_normalization.BatchNormalization`
function node through its ``impl_selector`` hook: the selector returns an
implementation whose forward and backward compute local per-channel sums
(:mod:`multinode_bn.statistics`) and combine them across processes with one
collective each (:mod:`multinode_bn.communication`).
"""

import functools
import os
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

    __slots__ = ('count', 'host_count', 'mean', 'inv_std', 'statistics',
                 'call')

    def __init__(self, count, host_count, mean, inv_std, statistics, call):
        self.count = count
        #: The global count as a Python float, read from the host.
        self.host_count = host_count
        self.mean = mean
        self.inv_std = inv_std
        self.statistics = statistics
        self.call = call


_warned_without_loops = []


def choose_statistics(x, dtype):
    """The statistics backend for input ``x`` computed in ``dtype``.

    The C loops of :mod:`multinode_bn.cpu_kernels` for float32 and float64
    NumPy inputs computed in their own dtype (unless
    ``MULTINODE_BN_CPU_KERNELS=0``), the plain
    :class:`~multinode_bn.statistics.ReferenceStatistics` otherwise (CuPy,
    float16, mixed precision). Chosen once per input signature.
    """
    if type(x) is numpy.ndarray and dtype in cpu_kernels.SERVED_DTYPES:
        if not cpu_kernels.available():
            if not _warned_without_loops:
                _warned_without_loops.append(True)
                warnings.warn(
                    'multinode_bn was installed without its C extension (no '
                    'C compiler at install time?): batch normalization on '
                    'the CPU runs the slower NumPy code. Reinstall with a C '
                    'compiler to get the one-pass loops.', RuntimeWarning)
        elif _cpu_kernels_enabled() and cpu_kernels.serves(
                x, dtype):
            return cpu_kernels.CpuStatistics(dtype)
    return statistics.ReferenceStatistics(backend.get_array_module(x),
                                          dtype)


def _cpu_kernels_enabled():
    """``MULTINODE_BN_CPU_KERNELS``: ``0``, ``off``, ``false`` or ``no``
    switches the C loops off; ``1``, ``on``, ``true``, ``yes`` or unset
    keeps them (another value: a warning naming it, and on)."""
    value = os.environ.get('MULTINODE_BN_CPU_KERNELS', '1').strip().lower()
    if value in ('0', 'off', 'false', 'no'):
        return False
    if value not in ('1', 'on', 'true', 'yes', ''):
        warnings.warn(
            'MULTINODE_BN_CPU_KERNELS={!r} is not valid (accepted: 0, off, '
            'false, no to switch the C loops off; 1, on, true, yes); using '
            'the C loops.'.format(value), RuntimeWarning)
    return True


class MultiNodeBNImpl(_bn.GeneralBatchNormalizationImpl):
    """Forward and backward of batch normalization over the global batch.

    Args:
        exchange: A statistics exchange from
            :func:`multinode_bn.communication.create_exchange`.
        selector (MultiNodeBNImplSelector): Owner of the per-call input
            check that travels with the statistics, and of the statistics
            backend chosen per input signature.
    """

    def __init__(self, exchange, selector):
        self.exchange = exchange
        self.selector = selector

    @staticmethod
    def _nonfinite(local):
        """Debug mode: whether this process's statistics are not finite
        (reported in-band: every process then raises, naming this one)."""
        if not chainer.is_debug():
            return False
        xp = backend.get_array_module(local)
        return not bool(xp.isfinite(local).all())

    def forward(self, axis, gamma, x, x_layout, xp, expander,
                beta, eps, decay, running_mean, running_var):
        interm_dtype = numpy.promote_types(x.dtype, gamma.dtype)
        stats = self.selector.statistics_for(x, interm_dtype)
        layout = statistics.Layout.of(x, axis)
        x3 = layout.view(x)
        if x3.size:
            moments = stats.local_moments(x3)
        else:
            moments = xp.zeros((x3.shape[1], 3), statistics.MOMENTS_DTYPE)
        moments, host_count = self.selector.exchange_moments(
            moments, x3.shape[0] * x3.shape[2], eps,
            self._nonfinite(moments))

        count = moments[0, 0]
        mean = moments[:, 1]
        var = moments[:, 2] / xp.maximum(count, 1.0)
        inv_std = 1.0 / xp.sqrt(var + eps)

        gamma64 = gamma.astype(statistics.MOMENTS_DTYPE).ravel()
        y3 = stats.normalize(
            x3, mean, gamma64 * inv_std,
            beta.astype(statistics.MOMENTS_DTYPE).ravel(), x.dtype)
        y = layout.restore(y3)

        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, count,
                            decay, gamma.shape)

        shape = gamma.shape
        forward_data = _ForwardData(count, host_count, mean, inv_std, stats,
                                    self.selector.current)
        return (y, x_layout, running_mean, running_var,
                mean.astype(interm_dtype).reshape(shape),
                var.astype(interm_dtype).reshape(shape),
                inv_std.astype(interm_dtype).reshape(shape), forward_data)

    def backward(self, axis, gamma, gy, x, x_layout, xp,
                 expander, mean, inv_std, eps, var, forward_data):
        stats = forward_data.statistics
        layout = statistics.Layout.of(x, axis)
        x3 = layout.view(x)
        # The upstream gradient seen in the input's memory order: a view
        # when it has that order, one copy otherwise.
        gy3 = layout.view(gy)
        mean64, inv_std64 = forward_data.mean, forward_data.inv_std
        if x3.size:
            sums = stats.backward_sums(x3, gy3, mean64)
        else:
            sums = xp.zeros((2, x3.shape[1]), statistics.MOMENTS_DTYPE)
        sums = self.selector.exchange_sums(
            'backward', sums, forward_data.call,
            nonfinite=self._nonfinite(sums))

        gamma64 = gamma.astype(statistics.MOMENTS_DTYPE).ravel()
        p, q, r = statistics.gradient_coefficients(
            gamma64, inv_std64, sums, forward_data.count)
        gx = layout.restore(
            stats.input_gradient(x3, gy3, mean64, p, q, r, x.dtype))

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
    statistics exchange, the input signatures already described, the
    statistics backend per signature, a label and a call count. Every
    exchange it makes carries the digest of what it is (its kind, the label,
    the call number, its size, the configuration and the input signature;
    see :mod:`multinode_bn.validation`), so processes in different exchanges
    all raise the same :class:`~multinode_bn.validation.InconsistentInputError`
    before any output or state is produced.

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
        #: The owning link's name in its parent (``link.name``), if any.
        self.link_name = None
        # An explicit label (the link's path after create_mnbn_model).
        self._label = None
        # The order of this link's first synchronized call among the links
        # on its communicator: links never called, or called on some
        # processes only in evaluation mode, take no number.
        self._number = None
        self.calls = 0
        #: What the owning link adds to the configuration that every
        #: process must share: ``(name, value)`` pairs (``use_gamma``,
        #: ``use_beta``, ``finetune``).
        self.link_config = ()
        # Until one header exchange has passed, processes may not even agree
        # on the size of the statistics buffer.
        self._agreed = False
        self._described = {}
        self._current = None
        self._statistics = {}
        self._sequence = 0
        #: Whether :meth:`prepare` ran for the call about to be applied.
        self.prepared = False
        # The shift of the exchanged sums: the same on every process (the
        # previous global mean of this link), near the mean of the next
        # batch; zero before the first exchange.
        self._shift = None

    @property
    def label(self):
        """How reports and the exchange identity name this link: its path
        after :func:`~multinode_bn.create_mnbn_model` (or any label set),
        otherwise its name in its parent; with the order of its first
        synchronized call on its communicator."""
        if self._label is not None:
            return self._label
        label = 'MultiNodeBatchNormalization' + (
            '' if self.link_name is None else " '{}'".format(self.link_name))
        if self._number is not None:
            label += ' #{}'.format(self._number)
        return label

    @label.setter
    def label(self, value):
        self._label = value

    def __call__(self, batch_norm_func, inputs):
        # A new implementation object per call, held by Chainer's node: the
        # selector holds no reference back, so a dropped link frees its
        # communicator at once rather than at a cyclic collection.
        return MultiNodeBNImpl(self.exchange, self)

    def describe(self, kind='forward', call=None):
        """What an exchange is, for stall and error reports."""
        what = self._current.what if self._current else ''
        return '{} exchange of {} (call {}, {})'.format(
            kind, self.label, self.calls if call is None else call, what)

    def prepare(self, x, gamma, beta, axis, eps=None, decay=None,
                running=()):
        """Counts the call and checks the input across processes.

        Every argument is checked locally first (``running``: the running
        statistics to update). The first call exchanges a small fixed-size
        header describing each process's input; every call checks the same
        description, and the identity of the exchange, inside the
        statistics exchange itself, at no extra collective. Either way a
        problem on any process raises the same
        :class:`~multinode_bn.validation.InconsistentInputError` on all of
        them, before anything is computed or updated.
        """
        self.exchange.admit(self.describe)
        self.calls += 1
        x_arr, g_arr, b_arr = (_array_of(v) for v in (x, gamma, beta))
        # The logical shape: a Variable in a memory layout (channels last)
        # holds its array in another axis order.
        x_shape = tuple(x.shape)
        key = (x_shape, x_arr.dtype, g_arr.shape, g_arr.dtype,
               b_arr.shape, b_arr.dtype, axis, type(x_arr), type(g_arr),
               tuple(getattr(r, 'shape', None) for r in running))
        described = self._described.get(key)
        if described is None:
            described = self._describe_input(x_shape, x_arr, g_arr, b_arr,
                                             axis, running)
            if len(self._described) > 64:
                self._described.clear()
            self._described[key] = described
        width = validation.INBAND_LEN + 1 + 2 * g_arr.size
        problem = described.problem
        if self._agreed and problem == validation.OK and \
                width != self.exchange.width:
            problem = validation.WIDTH_CHANGED
        self._current = _Call(described, problem, self.calls, (
            ('eps', _number(eps)), ('decay', _number(decay)))
            + tuple(self.link_config))
        if not self._agreed:
            if self._number is None:
                self._number = communication.link_number(self.comm)
            self._check_headers('input check', self._current)
            self.exchange.width = width
            self._agreed = True
        elif problem:
            # Take part in this call's statistics exchange all the same, so
            # that every process learns of the problem in one collective.
            xp = backend.get_array_module(g_arr)
            self.exchange_moments(xp.zeros(
                ((self.exchange.width - validation.INBAND_LEN - 1) // 2, 3),
                statistics.MOMENTS_DTYPE), 0)
        self.prepared = True

    def _describe_input(self, x_shape, x_arr, g_arr, b_arr, axis, running):
        if isinstance(axis, int):
            axis = (axis,)
        axis = tuple(_bn._compute_axis(len(x_shape), g_arr.ndim, axis))
        x_device, p_device = _device_kind(x_arr), _device_kind(g_arr)
        problem = validation.local_problem(
            x_shape, x_arr.dtype, g_arr.shape, g_arr.dtype, b_arr.dtype,
            axis, self.communication_backend_name, x_device, p_device,
            beta_shape=b_arr.shape,
            running_shapes=[r.shape for r in running if r is not None])
        header = validation.encode_header(
            x_shape, x_arr.dtype, g_arr.shape, g_arr.dtype, axis,
            self.communication_backend_name, x_device, problem)
        return _Described('x {} {}'.format(x_arr.dtype, x_shape), problem,
                          header, validation.agreeing_part(header))

    @property
    def current(self):
        """The call in progress (its input, problem, number and
        configuration), kept by its backward."""
        return self._current

    def identity(self, kind, current):
        """What an exchange of call ``current`` is: equal on every process
        that makes the same exchange."""
        if current.prefix is None:
            # What all exchanges of the call share, written once per call.
            current.prefix = repr((self.label, self._number, current.call,
                                   self.exchange.width, current.config,
                                   current.described.signature))
        return kind, current.prefix

    def _check_headers(self, kind, current, nonfinite=False):
        call = current.call
        text = '{} call {} {} exchange, {}'.format(
            self.label, call, kind, ' '.join(
                '{}={}'.format(name, value) for name, value in current.config))
        header = validation.for_exchange(current.described.header,
                                         current.problem, nonfinite, text)
        headers = self.exchange.allgather_header(
            header, lambda: self.describe(kind, call))
        validation.check_headers(headers, self.exchange.rank, self.label)
        return headers

    def exchange_sums(self, kind, buf, current=None, nonfinite=False,
                      problem=validation.OK):
        """Sums ``buf`` (float64) over processes with the in-band identity
        of this exchange of call ``current`` (default: the call in
        progress); raises on every process if any process is in another
        exchange, had a problem or (debug mode) non-finite values."""
        return self._exchange(kind, buf, current, nonfinite, problem)[0]

    def _exchange(self, kind, buf, current=None, nonfinite=False,
                  problem=validation.OK, samples=0):
        """:meth:`exchange_sums`, with the summed in-band header."""
        current = current or self._current
        header = validation.inband_header(
            validation.exchange_digest(self.identity(kind, current)),
            problem, nonfinite, samples)
        describe = functools.partial(self.describe, kind, current.call)
        self.exchange.admit(describe)
        if self.exchange.size == 1:
            sums, summed = buf, header
        else:
            sums, summed = self.exchange.allreduce_sums(buf, header,
                                                        describe)
        if not validation.inband_agrees(summed):
            self._disagreement(kind, current, nonfinite)
        return sums, summed

    def _disagreement(self, kind, current, nonfinite):
        """Every process is here together (they read the same sums): the
        full headers name what differs, and all raise the same error."""
        call = current.call
        headers = self._check_headers(kind, current, nonfinite)
        bad = validation.nonfinite_ranks(headers)
        if bad:
            raise FloatingPointError(
                '{}: non-finite {} statistics from rank(s) {} (call {}, '
                'raised on rank {}). Check the input of those ranks.'.format(
                    self.label, kind, ', '.join(map(str, bad)), call,
                    self.exchange.rank))
        raise validation.InconsistentInputError(
            '{} (raised on rank {}): processes disagree on the {} exchange '
            'of call {}.'.format(self.label, self.exchange.rank, kind, call))

    def next_sequence(self):
        """A number that orders the double-backward exchanges of a link
        (the same on every process that makes the same exchanges)."""
        self._sequence += 1
        return self._sequence

    def statistics_for(self, x, dtype):
        """The statistics backend for ``x`` computed in ``dtype``, chosen
        once per array type and dtypes (:func:`choose_statistics`)."""
        key = (type(x), x.dtype, dtype)
        stats = self._statistics.get(key)
        if stats is None:
            stats = self._statistics[key] = choose_statistics(x, dtype)
        return stats

    def exchange_moments(self, moments, samples, eps=0.0, nonfinite=False):
        """Global ``(count, mean, m2)`` from local ones, and the global
        count as a host number (``samples``: the local count); raises on
        every process if any input was bad.

        One collective of sums around the shared shift (the previous global
        mean of this link). Should the new mean lie far from it (the first
        call, or a jump of the data), the sums are exchanged once more
        around the mean just found: every process sees the same numbers,
        so all of them decide alike.
        """
        xp = backend.get_array_module(moments)
        shift = self._shift
        if (shift is None or shift.shape[0] != moments.shape[0]
                or backend.get_device_from_array(shift)
                != backend.get_device_from_array(moments)):
            # First call, or the link moved to another device.
            shift = xp.zeros(moments.shape[0], statistics.MOMENTS_DTYPE)
        sums, summed = self._exchange(
            'forward', statistics.moments_to_shifted_sums(xp, moments, shift),
            nonfinite=nonfinite, problem=self._current.problem,
            samples=samples)
        count = validation.inband_samples(summed)
        if self.exchange.size == 1:
            return moments, count
        merged = statistics.shifted_sums_to_moments(xp, sums, shift)
        if statistics.shift_too_far(merged, shift, eps):
            shift = merged[:, 1]
            sums = self.exchange_sums(
                'forward again',
                statistics.moments_to_shifted_sums(xp, moments, shift))
            merged = statistics.shifted_sums_to_moments(xp, sums, shift)
        mean = merged[:, 1]
        self._shift = xp.where(xp.isfinite(mean), mean, shift)
        return merged, count


class _Described(object):
    """One input signature, described once."""

    __slots__ = ('what', 'problem', 'header', 'signature')

    def __init__(self, what, problem, header, signature):
        self.what, self.problem = what, problem
        self.header, self.signature = header, signature


class _Call(object):
    """The call in progress: its input, problem, number and configuration."""

    __slots__ = ('described', 'problem', 'call', 'config', 'what', 'prefix')

    def __init__(self, described, problem, call, config):
        self.described, self.problem = described, problem
        self.call, self.config = call, config
        self.what = described.what
        self.prefix = None


def _number(v):
    return None if v is None else float(v)


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
    collective); the second-order backward is the closed form of
    :class:`MultiNodeBatchNormalizationGrad` (one collective).
    """

    def __init__(self, impl_selector, eps=2e-5, mean=None, var=None,
                 decay=0.9, axis=None):
        # Chainer's constructor refuses an eps below cuDNN's minimum
        # whenever cuDNN is available; this node never uses cuDNN.
        with chainer.using_config('use_cudnn', 'never'):
            super(MultiNodeBatchNormalizationFunction, self).__init__(
                eps=eps, mean=mean, var=var, decay=decay, axis=axis,
                impl_selector=impl_selector)

    def forward_chainerx(self, inputs):
        # Chainer's ChainerX kernel would normalize with local statistics
        # only; falling back converts the arrays and runs the synchronized
        # implementation instead.
        return chainer.Fallback

    def forward(self, inputs):
        selector = self._impl_selector
        if not selector.prepared:
            # Applied directly rather than through
            # multi_node_batch_normalization: count and check the call here.
            x, gamma, beta = inputs
            selector.prepare(x, gamma, beta, self.axis, self.eps, self.decay,
                             running=(self.running_mean, self.running_var))
        selector.prepared = False
        with warnings.catch_warnings():
            # One local sample is fine when the global batch is larger; the
            # global count is checked after the exchange instead.
            for message in _ONE_SAMPLE_WARNINGS:
                warnings.filterwarnings('ignore', message=message)
            outputs = super(MultiNodeBatchNormalizationFunction,
                            self).forward(inputs)
        data = self.forward_data
        if isinstance(data, _ForwardData) and data.host_count <= 1:
            warnings.warn(
                'MultiNodeBatchNormalization received a global batch of {} '
                'sample(s) over all processes; the output is zero.'.format(
                    int(data.host_count)), UserWarning)
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
        self.retain_outputs((1, 2))
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
        """The second-order gradients in closed form, from this node's own
        inputs and outputs; one collective.

        Chainer's ``BatchNormalizationGrad.backward`` for one process, with
        every reduction over the global batch. With ``M`` the global count,
        ``s`` the inverse standard deviation, ``x_hat = (x - mean) s``,
        ``g_gamma = sum(gy x_hat)`` and ``g_beta = sum(gy)`` (global sums;
        this node outputs them divided by the number of processes ``P``) and
        ``a`` the upstream gradient of ``gx``:

        * the total upstream gradients of ``g_gamma`` and ``g_beta`` are
          ``u = sum_p(upstream_p) / P - gamma s / M * sum(a x_hat)`` and
          ``v = sum_p(upstream_p) / P - gamma s / M * sum(a)``;
        * ``d x_hat = u gy - gamma s g_gamma / M * a``, whose global sums
          follow from the sums above (``sum(gy x_hat) = g_gamma``);
        * ``gx2 = s d x_hat + (d mean + x_hat d std) / M`` with ``d mean =
          -s sum(d x_hat)`` and ``d std = -s (r + sum(x_hat d x_hat))``,
          ``r = gamma s sum(a (gy - (x_hat g_gamma + g_beta) / M))``;
        * ``ggy2 = u x_hat + v + gamma s a`` and ``ggamma2 = r / gamma / P``
          (written without the division).

        The statistics enter as constants, as in Chainer: the result is
        exact to second order.
        """
        F = chainer.functions
        x, gamma, gy = self.get_retained_inputs()
        ggamma1, gbeta1 = self.get_retained_outputs()
        ggx1, gggamma1, ggbeta1 = grad_outputs
        xp = backend.get_array_module(x)
        data = self.forward_data
        size = self._impl.exchange.size
        dtype = numpy.promote_types(
            numpy.promote_types(x.dtype, gamma.dtype), numpy.float32)

        def cast(v):
            return v if v.dtype == dtype else F.cast(v, dtype)

        def zero_if_none(v, like):
            return chainer.Variable(xp.zeros(like.shape, dtype)) \
                if v is None else cast(v)

        exp = self.expander
        axis = self.axis
        inv_m = dtype.type(1.0 / max(data.host_count, 1.0))
        inv_p = dtype.type(1.0 / size)
        s = data.inv_std.astype(dtype).reshape(gamma.shape)
        mean = data.mean.astype(dtype).reshape(gamma.shape)
        gamma_c, gy_c = cast(gamma), cast(gy)
        g_gamma = cast(ggamma1) * dtype.type(size)
        g_beta = cast(gbeta1) * dtype.type(size)
        a = zero_if_none(ggx1, x)
        x_hat = (cast(x) - xp.broadcast_to(mean[exp], x.shape)) * \
            xp.broadcast_to(s[exp], x.shape)

        # Every process is here (the node's outputs need every process):
        # zeros stand in for missing gradients so that all exchange alike.
        local = F.stack([
            F.sum(a * x_hat, axis=axis), F.sum(a, axis=axis),
            F.sum(a * gy_c, axis=axis),
            zero_if_none(gggamma1, gamma), zero_if_none(ggbeta1, gamma)])
        sums = AllreduceSum(self._impl.selector, data.call).apply((local,))[0]
        sum_a_xhat, sum_a, sum_a_gy, up_gamma, up_beta = F.separate(sums, 0)

        coeff = gamma_c * s
        coeff_m = coeff * inv_m
        u = up_gamma * inv_p - coeff_m * sum_a_xhat
        v = up_beta * inv_p - coeff_m * sum_a
        r_over_gamma = s * (sum_a_gy - (g_gamma * sum_a_xhat
                                        + g_beta * sum_a) * inv_m)
        r = gamma_c * r_over_gamma
        c2 = coeff_m * g_gamma
        d_xhat = F.broadcast_to(u[exp], x.shape) * gy_c - \
            F.broadcast_to(c2[exp], x.shape) * a
        sum_d_xhat_xhat = u * g_gamma - c2 * sum_a_xhat
        sum_d_xhat = u * g_beta - c2 * sum_a
        d_std = -s * (r + sum_d_xhat_xhat)
        d_mean = -s * sum_d_xhat
        gx2 = F.broadcast_to(s[exp], x.shape) * d_xhat + inv_m * (
            F.broadcast_to(d_mean[exp], x.shape)
            + x_hat * F.broadcast_to(d_std[exp], x.shape))
        ggy2 = (F.broadcast_to(u[exp], x.shape) * x_hat
                + F.broadcast_to((v)[exp], x.shape)
                + F.broadcast_to(coeff[exp], x.shape) * a)
        ggamma2 = r_over_gamma * inv_p
        grads = (F.cast(gx2, x.dtype) if gx2.dtype != x.dtype else gx2,
                 F.cast(ggamma2, gamma.dtype)
                 if ggamma2.dtype != gamma.dtype else ggamma2,
                 F.cast(ggy2, gy.dtype) if ggy2.dtype != gy.dtype else ggy2)
        return tuple(grads[i] for i in indexes)


class AllreduceSum(function_node.FunctionNode):
    """Differentiable sum over processes (its gradient is again a sum).

    Each exchange is a ``double backward`` exchange of the link's call
    ``current``, numbered in the order the processes make them.
    """

    def __init__(self, selector, current):
        self.selector = selector
        self.current = current

    def forward(self, inputs):
        a, = inputs
        xp = backend.get_array_module(a)
        flat = a.astype(statistics.MOMENTS_DTYPE).ravel()
        # Every exchange of a link has the link's width: a longer buffer
        # goes in pieces, each an exchange of its own.
        piece = self.selector.exchange.width - validation.INBAND_LEN
        parts = []
        for start in range(0, flat.size, piece):
            kind = 'double backward #{}'.format(self.selector.next_sequence())
            parts.append(self.selector.exchange_sums(
                kind, flat[start:start + piece], self.current))
        summed = xp.concatenate(parts) if len(parts) > 1 else parts[0]
        return summed.reshape(a.shape).astype(a.dtype, copy=False),

    def backward(self, indexes, grad_outputs):
        return AllreduceSum(self.selector, self.current).apply(grad_outputs)


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
    selector.prepare(x, gamma, beta, axis, eps, decay,
                     running=(running_mean, running_var))
    func = MultiNodeBatchNormalizationFunction(
        selector, eps=eps, mean=running_mean, var=running_var, decay=decay,
        axis=axis)
    return func.apply((x, gamma, beta))[0]
