"""Builds the per-step SNN graph of threshold_balance from a BN-folded ANN graph and one scale
(lambda) per activation.

Every value carries a *unit* u (a tensor broadcastable to one sample): the ANN activation it
stands for is ~ u * value. Graph inputs have u = 1; an IF neuron's spikes have u = lambda (one
spike per step = lambda). Units are folded into parameters wherever possible, which is
Rueckauer 2017's weight normalisation (eq. 7-8: W' = W lambda_{l-1} / lambda_l, b' = b / lambda_l):

  * input side: a conv/linear reading a value with unit u multiplies its weights by u along
    the input channels; its output has u = 1;
  * output side: before an IF with scale lambda, its input is rescaled to unit lambda by
    multiplying the producing conv/linear's weights and bias by u / lambda per output channel
    (through pooling, reshapes and adds), so the IF's threshold is 1;
  * where no producer can absorb the factor (an identity shortcut carries spikes into an add),
    the IF keeps the input's unit and gets the threshold lambda / u instead (a float, or a
    ``[C, 1, 1]`` tensor for channel-wise scales, with v_init a tensor of the same shape).
Residual adds bring their operands to one unit (the spiking operand's) by rescaling the
other operands' producers. With ``opts["burst"] = k > 1`` the neurons are ``BurstIF`` (up to k
spikes per step) and a spike stands for lambda / k. Pooling keeps per-channel units; a max pooling of converted values becomes a
``SpikeMaxPool2d`` (``max_pool="lateral"`` or ``"gate"``) or stays a per-step max (``"spikes"``).
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from snnc.errors import SnncError, UnsupportedOp, node_ref
from snnc.ir import annotate, info, op_name
from snnc.ops import IF, BurstIF, DirectEncoder, PoissonEncoder, Readout, SpikeMaxPool2d, is_snnc_op
from snnc.ops.qcfs import QCFS

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d)
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, *_MAX_POOLS, SpikeMaxPool2d)
_POOL_FUNCS = (F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.max_pool2d)
_RESHAPE_METHODS = ("flatten", "view", "reshape")
_SAME_SHAPE_METHODS = ("contiguous",)
_ADDS = (operator.add, torch.add)
RECORD = "record"


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.ReLU, QCFS))
    if node.op == "call_function":
        return node.target in (torch.relu, F.relu)
    return node.op == "call_method" and node.target == "relu"


def _sample_shape(node):
    return tuple(info(node).shape[1:])


def _is_one(u) -> bool:
    return bool((u == 1).all())


def _channel_vector(u, node):
    """``u`` as one value per channel (1st sample dim), or None if it varies inside a channel."""
    shape = _sample_shape(node)
    if not shape:
        return u.reshape(1)
    full = u.expand(shape).reshape(shape[0], -1)
    return full[:, 0].clone() if bool((full == full[:, :1]).all()) else None


def _as_channel_unit(vec, node):
    shape = _sample_shape(node)
    return vec.reshape(len(vec), *([1] * (len(shape) - 1))) if len(vec) > 1 else vec.reshape(())


class Builder:
    """One conversion: ``Builder(ann, scales, opts).build()``; ``scales`` maps activation nodes
    (of ``ann``'s graph, matched by name) to a lambda tensor, or to ``RECORD`` to put an
    identity recorder there (spiking calibration); activations not listed stay ReLUs."""

    def __init__(self, ann: fx.GraphModule, scales: dict, opts: dict):
        self.root = copy.deepcopy(ann)
        self.root.snnc_spec = copy.deepcopy(ann.snnc_spec)
        annotate(self.root)
        self.scales = {n.name if isinstance(n, fx.Node) else n: s for n, s in scales.items()}
        self.opts = opts
        self.graph = fx.Graph()
        self.env, self.unit, self.spiking, self.unconverted = {}, {}, set(), set()
        self.recorders = {}
        self.neurons = {}   # activation node name -> IF module name in the built graph
        self.uses = {}
        for n in self.root.graph.nodes:
            if n.op == "call_module":
                self.uses[n.target] = self.uses.get(n.target, 0) + 1

    # -- helpers ------------------------------------------------------------------------------
    def _module(self, node):
        return self.root.get_submodule(node.target) if node.op == "call_module" else None

    def _put_module(self, node, module, prefix):
        """Register ``module`` in place of the node's module (a call_module whose module no other
        node calls) or under a new name (function calls; a ReLU module called at several places,
        which becomes one neuron layer per call)."""
        if node.op == "call_module" and self.uses[node.target] == 1:
            parent, _, leaf = node.target.rpartition(".")
            setattr(self.root.get_submodule(parent) if parent else self.root, leaf, module)
            return node.target
        name, k = prefix, 0
        while hasattr(self.root, name):
            k += 1
            name = f"{prefix}_{k}"
        self.root.add_module(name, module)
        return name

    def _copy(self, node, unit):
        self.env[node] = self.graph.node_copy(node, lambda a: self.env[a])
        self.unit[node] = unit
        return self.env[node]

    def _tensor_args(self, node):
        return [a for a in node.all_input_nodes if info(a) is not None]

    # -- output-side folding ----------------------------------------------------------------------
    def absorb(self, node, factor, dry) -> bool:
        """Multiply the value of ``node`` by ``factor`` by changing the parameters of the layers
        that produce it (all-or-nothing); False if some producer cannot absorb it."""
        if _is_one(factor):
            return True
        if len(node.users) != 1:
            return False
        mod = self._module(node)
        if isinstance(mod, _WEIGHTED) and self.uses[node.target] == 1:
            vec = _channel_vector(factor, node)
            if vec is None:
                return False
            if not dry:
                w = mod.weight.data
                w.mul_(vec.view(-1, *([1] * (w.dim() - 1))).to(w.dtype))
                if mod.bias is not None:
                    mod.bias.data.mul_(vec.to(mod.bias.dtype))
            return True
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if isinstance(mod, (nn.Dropout, nn.Identity)) or (node.op == "call_method" and node.target in _SAME_SHAPE_METHODS):
            return self.absorb(src, factor, dry)
        if isinstance(mod, _POOLS) or node.target in _POOL_FUNCS:
            vec = _channel_vector(factor, node)
            return vec is not None and self.absorb(src, _as_channel_unit(vec, src), dry)
        if isinstance(mod, nn.Flatten) or node.target is torch.flatten or \
                (node.op == "call_method" and node.target in _RESHAPE_METHODS):
            return self.absorb(src, factor.expand(_sample_shape(node)).reshape(_sample_shape(src)), dry)
        if node.target in _ADDS or (node.op == "call_method" and node.target == "add"):
            ins = self._tensor_args(node)
            if any(_sample_shape(a) != _sample_shape(node) for a in ins):
                return False   # a broadcasting add: the factor would not map onto one operand
            ok = all(self.absorb(a, factor, True) for a in ins)
            if ok and not dry:
                for a in ins:
                    self.absorb(a, factor, False)
            return ok
        return False

    # -- node kinds -------------------------------------------------------------------------------
    def weighted(self, node, mod):
        src = node.args[0]
        u = self.unit[src]
        if not _is_one(u):
            if self.uses[node.target] != 1:
                raise UnsupportedOp(f"threshold_balance: {node_ref(node)} shares its weights with another "
                                    "node, so the input scale cannot be folded into them")
            if isinstance(mod, nn.Linear):
                rows = u.expand(_sample_shape(src)).reshape(-1, mod.in_features)
                vec = rows[0] if bool((rows == rows[:1]).all()) else None
            else:
                vec = _channel_vector(u, src)
                if vec is not None and mod.groups != 1 and not bool((vec == vec[0]).all()):
                    vec = None
                if vec is not None and mod.groups != 1:
                    vec = vec[:1].expand(mod.in_channels // mod.groups)
            if vec is None:
                raise UnsupportedOp(f"threshold_balance: the input scale of {node_ref(node)} varies in a "
                                    "way its weights cannot absorb")
            w = mod.weight.data
            w.mul_(vec.view(1, -1, *([1] * (w.dim() - 2))).to(w.dtype))
        self._copy(node, torch.tensor(1.0))

    def activation(self, node):
        src = node.all_input_nodes[0]
        u_in = self.unit[src]
        scale = self.scales.get(node.name)
        mod = self._module(node)
        if scale is None:                       # not converted (yet): ReLU is positively homogeneous
            self._copy(node, u_in)
            self.unconverted.add(node)
            return
        if isinstance(scale, str) and scale == RECORD:
            name = self._put_module(node, nn.Identity(), f"record_{node.name}")
            self.env[node] = self.graph.call_module(name, (self.env[src],))
            self.recorders[node.name] = (name, u_in)
            self.unit[node] = u_in
            return
        burst = self.opts.get("burst", 1)
        scale = scale / burst   # a burst neuron's spike is worth lambda / burst (up to burst per step)
        factor = u_in / scale
        if self.absorb(src, factor, dry=True):
            self.absorb(src, factor, dry=False)
            v_th = 1.0
        else:
            th = (scale / u_in).expand(_sample_shape(node))
            vec = _channel_vector(th, node)
            if vec is None:
                raise UnsupportedOp(f"threshold_balance: {node_ref(node)} reads values whose scale varies "
                                    "within a channel; cannot choose a threshold")
            v_th = float(vec[0]) if bool((vec == vec[0]).all()) else _as_channel_unit(vec, node)
        frac = self.opts["v_init_fraction"]
        # a per-channel threshold (an identity skip brings spikes of channel-wise scales into the
        # add) gets a per-channel start v_init = frac * v_th, so the half-threshold start of
        # Bu 2022 applies to residual nets as well
        v_init = frac * v_th if frac else 0.0
        neuron = BurstIF(max_spikes=burst, v_th=v_th, v_init=v_init) if burst > 1 else \
            IF(v_th=v_th, reset=self.opts["reset"], v_init=v_init)
        name = self._put_module(node, neuron, f"if_{node.name}")
        self.neurons[node.name] = name
        self.env[node] = self.graph.call_module(name, (self.env[src],))
        self.unit[node] = scale
        self.spiking.add(node)

    def add(self, node):
        ins = self._tensor_args(node)
        units = [self.unit[a].expand(_sample_shape(a)) for a in ins]
        if all(torch.equal(units[0], u) for u in units[1:]):
            self._copy(node, self.unit[ins[0]])
            return
        fixed = [a for a in ins if not self.absorb(a, torch.tensor(2.0), dry=True)]
        target = self.unit[fixed[0]] if fixed else self.unit[ins[0]]
        for a in ins:
            factor = self.unit[a] / target
            if not self.absorb(a, factor, dry=True):
                raise UnsupportedOp(f"threshold_balance: {node_ref(node)} adds values with different scales "
                                    f"and {node_ref(a)} cannot be rescaled (two spiking operands with different "
                                    "thresholds?)")
            self.absorb(a, factor, dry=False)
        self._copy(node, target)

    def _max_pool(self, node, mod):
        """A MaxPool2d (module or ``F.max_pool2d``) on converted values, per ``opts["max_pool"]``:
        ``"lateral"`` / ``"gate"`` become ``SpikeMaxPool2d`` (running sums; ``snnc/ops/pooling.py``),
        ``"spikes"`` keeps the per-step max of the spikes, ``"refuse"`` raises."""
        src, how = node.args[0], self.opts["max_pool"]
        if how == "refuse" or (how == "spikes" and src not in self.spiking):
            raise UnsupportedOp(
                f"threshold_balance: {node_ref(node)} is a max pooling of converted values and max_pool={how!r}; "
                "use max_pool='lateral' (exact max of the accumulated inputs, Li 2022), 'gate' (Rueckauer 2017) "
                "or 'spikes' (per-step max of spikes, over-estimates the rate)")
        if how == "spikes":
            return None
        if isinstance(mod, nn.MaxPool1d):
            raise UnsupportedOp(f"threshold_balance: {node_ref(node)} is a MaxPool1d; max_pool={how!r} has a 2-d "
                                "op only (SpikeMaxPool2d): use max_pool='spikes' or a MaxPool2d")
        pool = mod if mod is not None else nn.MaxPool2d(*node.args[1:], **node.kwargs)
        try:
            spiking_pool = SpikeMaxPool2d.from_max_pool(pool, mode=how)
        except ValueError as e:
            raise UnsupportedOp(f"threshold_balance: {node_ref(node)}: {e}") from None
        name = self._put_module(node, spiking_pool, f"max_pool_{node.name}")
        return self.graph.call_module(name, (self.env[src],))

    def pool_or_reshape(self, node, mod):
        src = node.args[0]
        u = self.unit[src]
        is_max = isinstance(mod, _MAX_POOLS) or node.target is F.max_pool2d
        replaced = self._max_pool(node, mod) if is_max and src not in self.unconverted else None
        if isinstance(mod, nn.Flatten) or node.target is torch.flatten or \
                (node.op == "call_method" and node.target in _RESHAPE_METHODS):
            unit = u if u.dim() == 0 else u.expand(_sample_shape(src)).reshape(_sample_shape(node))
        elif u.dim() == 0:
            unit = u
        else:
            vec = _channel_vector(u, src)
            if vec is None:
                raise UnsupportedOp(f"threshold_balance: {node_ref(node)} pools values whose scale varies "
                                    "within a channel")
            unit = _as_channel_unit(vec, node)
        if replaced is not None:
            self.env[node], self.unit[node] = replaced, unit
        else:
            self._copy(node, unit)
        if is_max and src in self.spiking:
            self.spiking.add(node)
        if src in self.unconverted:
            self.unconverted.add(node)

    # -- driver ------------------------------------------------------------------------------------
    def build(self) -> fx.GraphModule:
        opts = self.opts
        for node in self.root.graph.nodes:
            mod = self._module(node)
            if node.op == "placeholder":
                enc = PoissonEncoder(seed=opts["seed"], signed=opts["signed"]) if opts["encoding"] == "poisson" \
                    else DirectEncoder()
                ph = self.graph.node_copy(node)
                self.env[node] = self.graph.call_module(self._put_module(node, enc, "encoder"), (ph,))
                self.unit[node] = torch.tensor(1.0)
            elif node.op == "output":
                self.output(node)
            elif mod is not None and is_snnc_op(mod) and not isinstance(mod, QCFS):
                raise SnncError(f"threshold_balance: {node_ref(node)} is already a spiking op "
                                f"({op_name(self.root, node)}); threshold_balance converts ANN graphs")
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                raise SnncError(f"threshold_balance: {node_ref(node)} is a BatchNorm; run fold_bn first")
            elif isinstance(mod, (nn.Dropout, nn.Identity)) or node.target is F.dropout or \
                    (node.op == "call_method" and node.target in _SAME_SHAPE_METHODS):
                self.remove(node)
            elif isinstance(mod, _WEIGHTED):
                self.weighted(node, mod)
            elif is_activation(self.root, node):
                self.activation(node)
            elif node.target in _ADDS or (node.op == "call_method" and node.target == "add"):
                self.add(node)
            elif isinstance(mod, (*_POOLS, nn.Flatten)) or node.target in (*_POOL_FUNCS, torch.flatten) or \
                    (node.op == "call_method" and node.target in _RESHAPE_METHODS):
                self.pool_or_reshape(node, mod)
            else:
                self.generic(node)
        out = fx.GraphModule(self.root, self.graph, class_name=type(self.root).__name__)
        out.graph.eliminate_dead_code()
        out.recompile()
        out.delete_all_unused_submodules()
        out.snnc_spec = {**copy.deepcopy(self.root.snnc_spec), "layout": "step", "T": None}
        return annotate(out)

    def remove(self, node):
        """Dropout (identity at inference), nn.Identity and .contiguous(): the value passes through."""
        src = node.args[0]
        self.env[node], self.unit[node] = self.env[src], self.unit[src]
        for group in (self.spiking, self.unconverted):
            if src in group:
                group.add(node)

    def generic(self, node):
        ins = self._tensor_args(node)
        # an op that reads only a shape (x.size(0), x.shape) does not care about the scale
        if info(node) is not None and any(not _is_one(self.unit[a]) for a in ins):
            raise UnsupportedOp(f"threshold_balance: {node_ref(node)} ({op_name(self.root, node)}) reads "
                                "spikes of a converted layer; only conv/linear, pooling, reshapes, adds and "
                                "dropout may follow a converted activation")
        self._copy(node, torch.tensor(1.0) if info(node) is not None else None)

    def output(self, node):
        res = node.args[0]
        if not isinstance(res, fx.Node) or info(res) is None:
            raise UnsupportedOp("threshold_balance: the graph must return one tensor (the logits); "
                                f"it returns {res!r}")
        u = self.unit[res]
        if not _is_one(u):
            if not self.absorb(res, u, dry=True):
                raise UnsupportedOp(f"threshold_balance: the output {node_ref(res)} carries spikes; the last "
                                    "layer must be a conv/linear (it becomes the membrane readout)")
            self.absorb(res, u, dry=False)
        name = self._put_module(node, Readout("membrane"), "readout")
        self.graph.output(self.graph.call_module(name, (self.env[res],)))
