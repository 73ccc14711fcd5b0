"""Block reconstruction (BRECQ-style; XQuant's ``finetune_level`` 2): learned rounding of the
weights of several consecutive layers at once, so that each layer's rounding also makes up for
the others' and for the activation quantization between them.

A block is a run of consecutive ONNX nodes that computes one tensor from one: it starts at a
Conv/Gemm/MatMul layer and takes the nodes after it, in graph order, for as long as each reads
only the block's input, tensors the block computes and constants, up to ``max_layers`` layers.
Its ops are those layers, the one-input ops between them (activations, pools, Flatten) and
elementwise ``Add``/``Sub``/``Mul``/``Div``, so a residual block (``x + f(x)``) or a
squeeze-excitation gate is one block. It ends at its longest prefix that is closed (nothing it
computes but its last output is read outside it or is a graph output) and ends in such a merge,
or, without one, at its longest closed prefix: so blocks follow a network's residual blocks
rather than straddle them.

It runs in PyTorch exactly as its QDQ model does: every planned activation is fake-quantized
with the calibrated parameters (straight-through gradients), and each weight is AdaRound's soft
quantization ``W = s·(clip(⌊W/s⌋ + h(V) + z, qmin, qmax) − z)`` with the rectified sigmoid
``h``. All the block's ``V`` minimise ``‖block(x_q) − block_float(x)‖²`` (the last node's output
before its own quantization) plus the annealed regulariser that drives ``h`` to 0 or 1, on the
block's inputs in the partially quantized model.

Optionally the step sizes of the activations quantized inside the block are learned with the
rounding (LSQ, Esser et al. 2020): ``x_q = s·(clip(⌊x/s⌉ + z, qmin, qmax) − z)`` with the
rounding's gradient passed straight through, so that ``s`` gets LSQ's gradient (the clipped
values pull it up, the rounded ones either way); ``log s`` is what is optimised, the zero point
stays. Only roots whose every tensor lies inside the block learn (``learnable_roots``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import ModelProto, NodeProto, helper, numpy_helper

from edgequant.algorithms.adaround import (
    GAMMA,
    ZETA,
    AdaRoundOptions,
    beta_at,
    import_torch,
    one_thread,
)
from edgequant.algorithms.layer import quant_range, supported
from edgequant.planning.plan import QuantPlan, WeightPlan
from edgequant.quant.params import QuantParams, Scheme, quantize_bias, round_values

UNARY = ("Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "GlobalAveragePool",
         "MaxPool", "AveragePool", "Flatten")
WEIGHTED = ("Conv", "Gemm", "MatMul")
BINARY = ("Add", "Sub", "Mul", "Div")
PROBE_STEPS = 10  # steps timed before a time limit cuts the rest


@dataclass
class Block:
    """Consecutive nodes computing ``nodes[-1]``'s output from ``nodes[0]``'s input 0;
    ``weights`` maps a weighted node's name to its WeightPlan."""

    nodes: list[NodeProto]
    weights: dict[str, WeightPlan] = field(default_factory=dict)

    @property
    def input(self) -> str:
        return self.nodes[0].input[0]

    @property
    def output(self) -> str:
        return self.nodes[-1].output[0]


def find_blocks(model: ModelProto, plan: QuantPlan, max_layers: int) -> list[Block]:
    """Blocks in graph order, each starting at a weighted layer whose weight the plan
    quantizes and not yet in a block (see the module's docstring)."""
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for i in node.input:
            readers.setdefault(i, set()).add(node.name)
    outputs = {o.name for o in model.graph.output}
    inits = {t.name for t in model.graph.initializer}
    order = list(model.graph.node)
    taken: set[str] = set()
    blocks = []
    for start, node in enumerate(order):
        if node.name in taken or not _rounded(node, plan):
            continue
        nodes, layers, closed, merged = [node], 1, 1, 0
        have = {node.input[0], *node.output}
        for n in order[start + 1:]:
            data = [i for i in n.input if i and i not in inits]
            if n.name in taken or not data or any(i not in have for i in data):
                break
            if _rounded(n, plan):
                if layers == max_layers:
                    break
                layers += 1
            elif not _computable(n, inits):
                break
            nodes.append(n)
            have.update(o for o in n.output if o)
            if _closed(nodes, readers, outputs):
                closed = len(nodes)
                merged = len(nodes) if n.op_type in BINARY else merged
        nodes = nodes[:merged or closed]
        block = Block(nodes, {n.name: plan.weights[n.name][1] for n in nodes if _rounded(n, plan)})
        taken.update(n.name for n in nodes)
        blocks.append(block)
    return blocks


def _computable(node: NodeProto, inits: set[str]) -> bool:
    """An op the runner computes besides the weighted layers: a one-input op of ``UNARY``
    (constant extra inputs, at most two), or an elementwise op of ``BINARY``."""
    if node.op_type in BINARY:
        return len(node.input) == 2 and len(node.output) == 1
    if node.op_type == "Pad":  # zero (constant) padding by constant amounts: TF-style "same" convs
        mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b"constant")
        return mode in (b"constant", "constant") and all(i in inits for i in node.input[1:] if i)
    return node.op_type in UNARY and all(i in inits for i in node.input[1:] if i) \
        and len([i for i in node.input[1:] if i]) <= 2


def _closed(nodes: list[NodeProto], readers: dict[str, set[str]], outputs: set[str]) -> bool:
    """Whether nothing ``nodes`` compute but the last node's first output is read outside them
    or is a graph output."""
    inside = {n.name for n in nodes}
    last = nodes[-1].output[0]
    return all(o == last or (o not in outputs and readers.get(o, set()) <= inside)
               for n in nodes for o in n.output if o) and len([o for o in nodes[-1].output if o]) == 1


def _rounded(node: NodeProto, plan: QuantPlan) -> bool:
    return node.op_type in WEIGHTED and 1 in plan.weights.get(node.name, {}) and supported(node)


def learnable_roots(block: Block, plan: QuantPlan, unsigned_nonnegative: bool = False) -> list[str]:
    """Roots of the activations ``block`` quantizes inside itself whose step size it may learn:
    every tensor of the root is computed inside the block (not its input, not its output), the
    range is not pinned by the user, and the scale is free (no power-of-two scheme, no unsigned
    stand-in for a symmetric signed type)."""
    inside = {o for n in block.nodes[:-1] for o in n.output if o}
    tensors: dict[str, list[str]] = {}
    for name, planned in plan.activations.items():
        tensors.setdefault(planned.root, []).append(name)
    out = []
    for t in sorted(inside):
        act = plan.activations.get(t)
        if act is None or act.root in out or act.root in plan.pinned or act.scheme.power_of_two:
            continue
        if unsigned_nonnegative and act.symmetric and act.dtype.signed:
            continue
        if all(n in inside for n in tensors[act.root]):
            out.append(act.root)
    return out


@dataclass(frozen=True)
class BlockStats:
    mse_before: float
    mse_after: float
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)  # root → learned activation scale
    optim_steps: int = 0  # optimisation steps run (fewer than asked under a time limit)
    held_before: float | None = None  # the same two errors on held-out samples (``reconstruct``'s ``held``)
    held_after: float | None = None

    @property
    def improved(self) -> bool:
        """The learned rounding lowers the block error, on held-out samples too where there are any."""
        held = self.held_before is None or self.held_after is None or self.held_after < self.held_before
        return self.mse_after < self.mse_before and held

    @property
    def ratio(self) -> float:
        """Error kept over error before: on the held-out samples where there are any; 1 where
        the learned rounding is not kept."""
        if not self.improved:
            return 1.0
        if self.held_before is not None and self.held_after is not None:
            return self.held_after / max(self.held_before, 1e-30)
        return self.mse_after / max(self.mse_before, 1e-30)


def reconstruct(block: Block, model: ModelProto, plan: QuantPlan, act_params: dict[str, QuantParams],
                weights: dict[str, tuple[np.ndarray, QuantParams]], biases: dict[str, np.ndarray],
                x: np.ndarray, target: np.ndarray, options: AdaRoundOptions, batch: int,
                progress: Callable[[int, int], None] | None = None, learn: tuple[str, ...] = (),
                act_lr: float = 1e-3, seconds: float | None = None,
                start: dict[str, np.ndarray] | None = None,
                held: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], BlockStats]:
    """Integer weights (by node name) of ``block`` that reconstruct ``target`` from ``x``
    (samples along axis 0). ``weights``: node → (float weight, params) to round; ``biases``:
    node → float bias; ``act_params``: root → params of the plan's activations; ``learn``:
    roots whose step size is learned too (``learnable_roots``), at rate ``act_lr`` on ``log s``;
    ``seconds``: a time limit, by which the number of steps (and with it the regulariser's
    schedule) is cut once the first ``PROBE_STEPS`` have timed a step; ``start``: integer
    weights (by node) from another rounding to start from and to beat (else round to nearest);
    ``held``: (inputs, targets) of samples not learned from, on which both roundings' errors are
    measured too (``BlockStats.improved``)."""
    torch = import_torch()
    with one_thread(torch):
        return _reconstruct(torch, block, model, plan, act_params, weights, biases, x, target, options, batch,
                            progress, learn, act_lr, seconds, start, held)


def _tensors(torch, x: np.ndarray, target: np.ndarray) -> tuple[Any, Any]:
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(np.ascontiguousarray(target, np.float32))


def _reconstruct(torch, block, model, plan, act_params, weights, biases, x, target, options, batch, progress,
                 learn, act_lr, seconds, start, held):
    began = time.perf_counter()
    runner = _Runner(torch, block, model, plan, act_params, weights, biases, start)
    xs, ts = _tensors(torch, x, target)
    before = runner.mse(xs, ts, hard=True, nearest=True)
    hx, ht = _tensors(torch, *held) if held is not None else (None, None)
    held_before = runner.mse(hx, ht, hard=True, nearest=True) if held is not None else None
    v = {k: t.clone().requires_grad_(True) for k, t in runner.v0.items()}
    groups = [{"params": list(v.values()), "lr": options.lr}]
    if learn:
        runner.steps = {r: torch.tensor(float(np.log(float(np.asarray(act_params[r].scale)))), requires_grad=True)
                        for r in learn}
        groups.append({"params": list(runner.steps.values()), "lr": act_lr})
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(options.seed)
    power = float((ts ** 2).mean()) or 1.0
    count = sum(t.numel() for t in v.values())
    step, probe = 0, time.perf_counter()
    while step < options.steps:
        if seconds is not None and step == PROBE_STEPS:
            per_step = (time.perf_counter() - probe) / PROBE_STEPS
            options = dataclasses.replace(options, steps=max(PROBE_STEPS + 1, min(options.steps,
                                                                                int(seconds / max(per_step, 1e-9)))))
        idx = torch.randint(xs.shape[0], (min(batch, xs.shape[0]),), generator=gen)
        out = runner.forward(xs.index_select(0, idx), v)
        # both terms scale-free: the error relative to the target's power, the regulariser's
        # mean over the block's weights (a block's outputs can be of any magnitude)
        loss = ((out - ts.index_select(0, idx)) ** 2).mean() / power
        beta = beta_at(step, options)
        if beta is not None and options.reg_weight > 0:
            loss = loss - options.reg_weight * sum((2 * _h(torch, t) - 1).abs().pow(beta).sum() for t in v.values()) / count
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if progress is not None and (step % 100 == 0 or step == options.steps):
            progress(step, options.steps)
    chosen = {k: runner.integers(k, v[k].detach()) for k in v}
    after = runner.mse(xs, ts, hard=True, v={k: t.detach() for k, t in v.items()})
    learned = {k: t.detach() for k, t in v.items()}
    held_after = runner.mse(hx, ht, hard=True, v=learned) if held is not None else None
    if runner.steps and held_after is not None:  # the learned steps stay only where held-out samples agree
        with_steps, runner.steps = runner.steps, {}
        without = runner.mse(hx, ht, hard=True, v=learned)
        if without < held_after:
            held_after, after = without, runner.mse(xs, ts, hard=True, v=learned)
        else:
            runner.steps = with_steps
    steps = {r: float(np.float32(np.exp(float(t.detach())))) for r, t in runner.steps.items()}
    return chosen, BlockStats(before, after, time.perf_counter() - began, steps, options.steps, held_before, held_after)


#: Where a block's learning starts from another rounding ``q``: ``h`` just past one half of
#: ``q − 1 + h``, so the hard rounding is ``q`` and either neighbour is one small step away.
START_H = 0.55


def _logit_h(h: float) -> float:
    """V with rectified sigmoid ``h(V) = h``."""
    return float(-np.log((ZETA - GAMMA) / (h - GAMMA) - 1))


def _h(torch: Any, v: Any) -> Any:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _shape(p: QuantParams, ndim: int) -> tuple[int, ...]:
    if p.axis is None or np.ndim(p.scale) == 0:
        return (1,) * ndim
    shape = [1] * ndim
    shape[p.axis] = -1
    return tuple(shape)


class _Runner:
    """The block as its QDQ model computes it, in torch, with soft or hard rounded weights."""

    def __init__(self, torch, block, model, plan, act_params, weights, biases, start=None):
        self.torch, self.block, self.plan = torch, block, plan
        self.act_params = act_params
        self.inits = {t.name: t for t in model.graph.initializer}
        self.consts: dict[str, Any] = {}
        self.steps: dict[str, Any] = {}  # root → learned log step size (``reconstruct``'s ``learn``)
        self.biases = {k: torch.from_numpy(self._quantized_bias(k, b, weights)) for k, b in biases.items()}
        self.base, self.v0, self.bounds, self.scale, self.zero, self.nearest = {}, {}, {}, {}, {}, {}
        for name, wp in block.weights.items():
            w, p = weights[name]
            shape = _shape(p, w.ndim)
            s = np.asarray(p.scale, np.float64).reshape(shape)
            z = np.asarray(p.zero_point, np.float64).reshape(shape)
            scaled = w.astype(np.float64) / s
            floor = np.floor(scaled)
            frac = np.clip(scaled - floor, 0.0, 1.0)
            self.base[name] = torch.from_numpy(floor.astype(np.float32))
            self.v0[name] = torch.from_numpy((-np.log((ZETA - GAMMA) / (np.clip(frac, 1e-4, 1 - 1e-4) - GAMMA) - 1))
                                             .astype(np.float32))
            self.scale[name] = torch.from_numpy(s.astype(np.float32))
            self.zero[name] = torch.from_numpy(z.astype(np.float32))
            self.bounds[name] = quant_range(p, wp.scheme)
            self.nearest[name] = torch.from_numpy(np.clip(round_values(scaled, wp.scheme.rounding) + z,
                                                          *self.bounds[name]).astype(np.float32))
            if start is not None and name in start:  # from another rounding (GPTQ's): it is the reference,
                q = start[name].astype(np.float64)  # and the learning starts at it, free to go one step up or down
                self.nearest[name] = torch.from_numpy(q.astype(np.float32))
                self.base[name] = torch.from_numpy((q - z - 1).astype(np.float32))
                self.v0[name] = torch.from_numpy(np.full(q.shape, _logit_h(START_H), np.float32))

    def _quantized_bias(self, name: str, bias: np.ndarray, weights: dict) -> np.ndarray:
        """The bias as the QDQ model holds it: int32 at ``s_in · s_w`` (``quantize_bias``)."""
        node = next(n for n in self.block.nodes if n.name == name)
        act = self.plan.activations.get(node.input[0])
        wp = self.block.weights[name]
        if act is None:
            return np.array(bias, np.float32)
        s_in = float(np.asarray(self.act_params[act.root].scale))
        q, scale, _ = quantize_bias(np.asarray(bias), s_in, np.asarray(weights[name][1].scale), wp.scheme)
        return (q.astype(np.float64) * scale).astype(np.float32)

    def weight(self, name: str, v: dict | None, hard: bool, nearest: bool = False):
        if nearest or v is None:
            q = self.nearest[name]
        else:
            h = _h(self.torch, v[name])
            h = (h >= 0.5).float() if hard else h
            q = self.torch.clamp(self.base[name] + h + self.zero[name], *self.bounds[name])
        return self.scale[name] * (q - self.zero[name])

    def integers(self, name: str, v) -> np.ndarray:
        q = self.torch.clamp(self.base[name] + (_h(self.torch, v) >= 0.5).float() + self.zero[name], *self.bounds[name])
        wp = self.block.weights[name]
        return q.numpy().astype(wp.dtype.np_dtype)

    def fake_quant(self, tensor: str, y):
        act = self.plan.activations.get(tensor)
        if act is None:
            return y
        p = self.act_params[act.root]
        z = float(np.asarray(p.zero_point))
        lo, hi = p.dtype.qmin, p.dtype.qmax
        step = self.steps.get(act.root)
        if step is not None:  # LSQ: the rounding straight through, the step size learned
            s = self.torch.exp(step)
            u = y / s
            u = u + (self.torch.round(u) - u).detach()
            return (self.torch.clamp(u + z, lo, hi) - z) * s
        s = float(np.asarray(p.scale))
        q = self.torch.clamp(self.torch.round(y / s) + z, lo, hi)
        return y + ((q - z) * s - y).detach()  # straight through

    def forward(self, x, v: dict | None, hard: bool = False, nearest: bool = False):
        """The last node's output before its own quantization (``x``: the block's input, as
        the QDQ model gives it, already quantized)."""
        values = {self.block.input: x}
        y = x
        for node in self.block.nodes:
            names = node.input[:1] if node.op_type in (*WEIGHTED, *UNARY, "Pad") else node.input
            ins = [values[i] if i in values else self._tensor(i) for i in names if i]
            y = self.op(node, ins, v, hard, nearest)
            values[node.output[0]] = self.fake_quant(node.output[0], y)
        return y

    def _tensor(self, name: str):
        """A constant input, in float32 (an initializer: ``find_blocks`` admits no other)."""
        if name not in self.consts:
            self.consts[name] = self.torch.from_numpy(numpy_helper.to_array(self.inits[name]).astype(np.float32))
        return self.consts[name]

    def mse(self, xs, ts, hard: bool, nearest: bool = False, v: dict | None = None) -> float:
        with self.torch.no_grad():
            total = 0.0
            for start in range(0, xs.shape[0], 16):
                out = self.forward(xs[start:start + 16], v, hard, nearest)
                total += float(((out - ts[start:start + 16]) ** 2).sum())
            return total / ts.numel()

    def op(self, node: NodeProto, ins: list, v, hard: bool, nearest: bool):
        torch, f = self.torch, self.torch.nn.functional
        a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
        x = ins[0]
        if node.op_type in BINARY:
            return {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[node.op_type](x, ins[1])
        if node.op_type in WEIGHTED:
            w = self.weight(node.name, v, hard, nearest)
            b = self.biases.get(node.name)
            if node.op_type == "Conv":
                pads = list(a.get("pads", [0] * (2 * (w.ndim - 2))))
                half = len(pads) // 2
                if pads[:half] != pads[half:]:
                    x = f.pad(x, [p for i in reversed(range(half)) for p in (pads[i], pads[i + half])])
                    pads = [0] * len(pads)
                conv = {3: f.conv1d, 4: f.conv2d, 5: f.conv3d}[w.ndim]
                return conv(x, w, b, a.get("strides", 1), pads[:half] or 0, a.get("dilations", 1), a.get("group", 1))
            if node.op_type == "Gemm":
                y = x @ (w.t() if a.get("transB", 0) else w) * a.get("alpha", 1.0)
                return y + a.get("beta", 1.0) * b if b is not None else y
            return x @ w
        if node.op_type == "Pad":
            return self._pad(node, x, a)
        if node.op_type == "Relu":
            return torch.relu(x)
        if node.op_type == "Clip":
            lo, hi = (self._const(n) for n in (list(node.input[1:3]) + ["", ""])[:2])
            return torch.clamp(x, a.get("min", lo), a.get("max", hi))
        if node.op_type == "LeakyRelu":
            return f.leaky_relu(x, a.get("alpha", 0.01))
        if node.op_type == "HardSwish":
            return f.hardswish(x)
        if node.op_type == "HardSigmoid":
            return torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0)
        if node.op_type == "Sigmoid":
            return torch.sigmoid(x)
        if node.op_type == "Tanh":
            return torch.tanh(x)
        if node.op_type == "GlobalAveragePool":
            return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
        if node.op_type == "Flatten":
            axis = a.get("axis", 1)
            return x.reshape(int(np.prod(x.shape[:axis])), -1)
        return self._pool(node, x, a)

    def _pad(self, node: NodeProto, x, a: dict):
        """ONNX Pad (constant mode): ``pads`` ``[b_1 … b_n, e_1 … e_n]`` (over ``axes`` when
        given), negative amounts crop, as torch's ``pad`` does."""
        value = 0.0
        if len(node.input) > 1:
            pads = numpy_helper.to_array(self.inits[node.input[1]]).astype(np.int64).reshape(-1).tolist()
            if len(node.input) > 2 and node.input[2]:
                value = float(numpy_helper.to_array(self.inits[node.input[2]]).reshape(-1)[0])
            axes = (numpy_helper.to_array(self.inits[node.input[3]]).astype(np.int64).reshape(-1) % x.ndim).tolist() \
                if len(node.input) > 3 and node.input[3] else list(range(x.ndim))
        else:
            pads, value, axes = list(a.get("pads", [])), float(a.get("value", 0.0)), list(range(x.ndim))
        n = len(axes)
        amount = {ax: (pads[k], pads[k + n]) for k, ax in enumerate(axes)}
        flat = [v for ax in reversed(range(x.ndim)) for v in amount.get(ax, (0, 0))]
        return self.torch.nn.functional.pad(x, flat, value=value)

    def _const(self, name: str) -> float | None:
        return float(numpy_helper.to_array(self.inits[name])) if name in self.inits else None

    def _pool(self, node: NodeProto, x, a: dict):
        f = self.torch.nn.functional
        kernel = a["kernel_shape"]
        pads = list(a.get("pads", [0] * (2 * len(kernel))))
        half = len(pads) // 2
        if pads[:half] != pads[half:] or len(kernel) != 2:
            raise ValueError(f"{node.name}: asymmetric padding or non-2-D pooling")
        strides = a.get("strides", [1] * len(kernel))
        if node.op_type == "MaxPool":
            return f.max_pool2d(x, kernel, strides, pads[:half], a.get("dilations", 1), bool(a.get("ceil_mode", 0)))
        return f.avg_pool2d(x, kernel, strides, pads[:half], bool(a.get("ceil_mode", 0)),
                            bool(a.get("count_include_pad", 0)))


def supported_block(block: Block) -> bool:
    """Whether the torch runner computes every node of ``block`` (Conv auto_pad NOTSET,
    2-D pools with symmetric padding)."""
    for node in block.nodes:
        a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return False
        if node.op_type in ("MaxPool", "AveragePool"):
            pads = list(a.get("pads", [0, 0, 0, 0]))
            if len(a.get("kernel_shape", [])) != 2 or pads[:2] != pads[2:] or a.get("storage_order", 0):
                return False
    return True


def scheme_of(block: Block) -> Scheme:
    return next(iter(block.weights.values())).scheme
