"""Fused LoRA projections with hand-derived backwards, for a frozen base weight (bf16/fp16/fp32 or NF4).

One projection computes, for x [N, i], base weight W [o, i], bias b, LoRA A [r, i], B [o, r], scale s:

    y = x W^T + b + s (x A^T) B^T

and, given dY [N, o] (the small [N, r] products first, so no [o, i] matrix is ever formed):

    dX = dY W + s (dY B) A
    dA = s (dY B)^T x
    dB = s dY^T (x A^T)

Projections that share an input (Q, K, V; gate and up) stack their A's, so x A^T is one matmul for
all of them, and so are [s dY_p B_p]_p^T x (every dA) and the LoRA part of dX. Where their weights
lie side by side (NF4 weights dequantized together), so do their outputs, and the rest is one matmul
each too: x W^T, (x A^T) B_block^T with B_block the block-diagonal of the s B_p, dY W, dY B_block and
dY^T (x A^T), whose diagonal blocks times s_p are the dB_p. The factors are cast
to the compute dtype (and B scaled by s) once per step where the caller passes its
:class:`LoraFactorCache` (the fused model owns one and starts a new step at each forward); without
one, at each call.

W and b are frozen (no gradient). x is saved, and so is x A^T ([N, sum r], small) where the forward computed
it: the backward then reuses it instead of one more product (a graph-only forward computes none). An NF4 weight
is dequantized right before each use, in the forward and again in the backward, into one workspace
per (device, dtype) that all projections of a model share (the cache's); the NF4 weights of one
input (Q/K/V, gate/up) are dequantized together in one launch where they fit that workspace together
(a model sizes it to its largest single weight), else one at a time, right before each product, so at
most one workspace's worth of dequantized matrices exists at a time.

- :func:`lora_projections`: several projections of one input (Q, K, V; or O alone), one Function.
- :func:`lora_mlp`: gate/up -> GLU -> down in one Function; saves x and the two pre-activations
  (gate, up), with the small x A^T products. Its backward writes the GLU's gradients over gate and up in
  place and, in the same kernel, the GLU's output h over dh, which down's LoRA gradient reads last (h is
  never recomputed by a second GLU forward).
  The MLP is token-wise, so where nothing keeps its pre-activations (a forward without autograd, a
  graph-only forward) it runs in chunks of at most ``chunk_rows`` tokens, and so does its backward: the
  [tokens, intermediate] tensors then exist one chunk at a time, and the memory of a long sequence's
  MLP does not grow with its length.

With ``graph_only=True`` (a checkpointed part recomputed for its backward, whose output is never read)
these Functions save what their backward needs but skip the products that make only their output,
and return placeholders (a zero broadcast to the output's shape) that carry the autograd graph; the
MLP then saves x alone and computes gate and up in its backward, a chunk at a time.

A projection is a :class:`Projection`; ``lora`` is None for a layer without an active adapter.
These are cuBLAS matmuls around Triton elementwise ops, so this module has no launch configs.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from fastbench.kernels.nf4 import dequantize_nf4_weight, dequantize_nf4_weights


class LoRA(NamedTuple):
    A: torch.Tensor  # [r, i]
    B: torch.Tensor  # [o, r]
    scale: float


class GLU(NamedTuple):
    """h = forward(gate, up); backward(dh, gate, up, dgate=, dup=, h=) -> (dgate, dup), writing h too where given,
    as fastbench.kernels.swiglu."""
    forward: Callable
    backward: Callable


class Projection(NamedTuple):
    weight: torch.Tensor  # [o, i] dense, or a bitsandbytes Params4bit (NF4, with .quant_state)
    bias: torch.Tensor | None
    lora: LoRA | None


def base_weight(weight: torch.Tensor, dtype: torch.dtype, cache: LoraFactorCache | None = None) -> torch.Tensor:
    """The dense [o, i] weight in ``dtype``: NF4 weights are dequantized into the cache's workspace (without a
    cache, into a new tensor)."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight if weight.dtype == dtype else weight.to(dtype)
    if state.dtype != dtype:
        return dequantize_nf4_weight(weight).to(dtype)
    out = None if cache is None else cache.workspace(state.shape, dtype, weight.device)
    return dequantize_nf4_weight(weight, out=out)


def _nf4_group(projections, dtype: torch.dtype, cache: LoraFactorCache | None) -> list | None:
    """The quant states of projections whose NF4 weights are dequantized together (more than one, all
    NF4 in ``dtype``, their matrices together within the cache's workspace where it has a set size), else
    None."""
    states = [getattr(p.weight, "quant_state", None) for p in projections]
    if len(projections) > 1 and all(st is not None and st.dtype == dtype for st in states):
        if cache is None or cache.fits(sum(st.shape[0] for st in states) * states[0].shape[1], dtype):
            return states
    return None


def _one_at_a_time(projections, dtype: torch.dtype, cache: LoraFactorCache | None):
    """The projections' dense weights, each made when the next is asked for: dequantized NF4 weights share the
    cache's workspace, so each is valid until the next is made (kernels queued on one stream read it first)."""
    for p in projections:
        yield base_weight(p.weight, dtype, cache)


def base_weights(projections, dtype: torch.dtype, cache: LoraFactorCache | None = None):
    """(W, [W_p]): the projections' dense weights; NF4 weights of one input (Q/K/V, gate/up) in ``dtype``
    are dequantized together, in one launch, side by side (in the cache's workspace), where they fit it
    together: W [sum o, i] is then that matrix, and the W_p its row blocks. Else (None, the W_p one at a time:
    an iterator, each valid until the next is taken)."""
    states = _nf4_group(projections, dtype, cache)
    if states is None:
        return None, _one_at_a_time(projections, dtype, cache)
    shape = torch.Size((sum(st.shape[0] for st in states), states[0].shape[1]))
    device = projections[0].weight.device
    out = torch.empty(shape, dtype=dtype, device=device) if cache is None else cache.workspace(shape, dtype, device)
    return out, dequantize_nf4_weights([p.weight for p in projections], out, quant_states=states)


@dataclass
class _Factors:
    """The LoRA factors of projections that share one input, in the compute dtype: the A's stacked
    into one [sum r, i] matrix (so x A^T is one matmul for all of them), each B pre-scaled by its s."""
    A: torch.Tensor | None  # None when no projection has an active LoRA
    B_scaled: tuple  # per projection: s B [o, r] or None
    B_scaled_t: tuple  # the same transposed (views), for the forward's addmm
    columns: tuple  # per projection: its slice of A's rows (of x A^T's columns) or None
    scales: tuple
    block: torch.Tensor | None = None  # B_block, once asked for

    @property
    def B_block(self) -> torch.Tensor:
        """Block-diagonal [sum o, sum r] of the s B's (every projection has a LoRA), so that for
        side-by-side outputs (x A^T) B_block^T = [s (x A_p^T) B_p^T]_p and dY B_block = [s dY_p B_p]_p."""
        if self.block is None:
            self.block = torch.block_diag(*self.B_scaled)
        return self.block

    @cached_property
    def B_block_t(self) -> torch.Tensor:
        return self.B_block.t()


def _columns(loras) -> list:
    columns, start = [], 0
    for lora in loras:
        columns.append(None if lora is None else slice(start, start + lora.A.shape[0]))
        start += 0 if lora is None else lora.A.shape[0]
    return columns


def _make_factors(loras, A, B_scaled) -> _Factors:
    return _Factors(A, tuple(B_scaled), tuple(None if B is None else B.t() for B in B_scaled), tuple(_columns(loras)),
                    tuple(None if l is None else l.scale for l in loras))


def _cast_factors(loras, dtype: torch.dtype) -> _Factors:
    As = [l.A for l in loras if l is not None]
    A = None if not As else (As[0] if len(As) == 1 else torch.cat(As)).to(dtype)
    B_scaled = [None if l is None else (l.B if l.scale == 1 else l.B * l.scale).to(dtype) for l in loras]
    return _make_factors(loras, A, B_scaled)


def _factors(projections, dtype: torch.dtype, cache: LoraFactorCache | None) -> _Factors:
    loras = [p.lora for p in projections]
    return _cast_factors(loras, dtype) if cache is None else cache.factors(loras, dtype)


class _GroupCast:
    """Where a known group's factors are cast at each step: A [sum r, i] and the s B_p in buffers kept between
    steps (those of ``previous``, an earlier cast of the same group, where given), the copies into them, and
    the :class:`_Factors` that view them (made once, so that their views and B_block are made once too)."""

    def __init__(self, loras, dtype: torch.dtype, previous: _GroupCast | None = None):
        present = [l for l in loras if l is not None]
        if previous is None:
            self.A = torch.empty((sum(l.A.shape[0] for l in present), present[0].A.shape[1]), dtype=dtype,
                                 device=present[0].A.device)
            self.Bs = [None if l is None else torch.empty(l.B.shape, dtype=dtype, device=l.B.device) for l in loras]
        else:
            self.A, self.Bs = previous.A, previous.Bs
        self.loras = loras
        self.params = tuple(t for l in present for t in (l.A, l.B))
        self.A_copies = [(l.A, self.A[rows]) for l, rows in zip(loras, _columns(loras)) if l is not None]
        self.B_copies = [(l.B, B, l.scale) for l, B in zip(loras, self.Bs) if l is not None]
        self.factors = _make_factors(loras, self.A, self.Bs)
        self._blocks = None

    def block_views(self) -> list[torch.Tensor] | None:
        """The diagonal blocks of the factors' B_block (one per B), once it exists; else None."""
        block = self.factors.block
        if self._blocks is None and block is not None:
            self._blocks, row, col = [], 0, 0
            for B in self.Bs:
                self._blocks.append(block[row:row + B.shape[0], col:col + B.shape[1]])
                row, col = row + B.shape[0], col + B.shape[1]
        return self._blocks


def cached_factor_bytes(projections, dtype: torch.dtype, cache: LoraFactorCache | None = None) -> int:
    """The bytes ``cache`` keeps between steps for projections that share an input: their A's stacked [sum r, i]
    and each s B_p [o_p, r_p], in ``dtype``, and, where their NF4 weights are dequantized together (every
    projection with a LoRA, biases alike), the block-diagonal B [sum o, sum r]; 0 without LoRA."""
    loras = [p.lora for p in projections if p.lora is not None]
    if not loras:
        return 0
    rank = sum(lora.A.shape[0] for lora in loras)
    elements = rank * loras[0].A.shape[1] + sum(lora.B.numel() for lora in loras)
    if _nf4_group(projections, dtype, cache) is not None and _agree(projections):
        elements += sum(_out_features(p) for p in projections) * rank
    return elements * dtype.itemsize


class LoraFactorCache:
    """What the fused LoRA Functions of one model reuse between calls: each group's factors cast to the compute
    dtype, and the buffer per (device, dtype) that its NF4 weights are dequantized into.

    ``workspace_bytes``: that buffer's size, made at its first use; NF4 weights of one input whose matrices
    together exceed it are dequantized one at a time (a model sizes it to its largest single weight, so gate
    and up of a wide MLP do not double the buffer). None: the buffer grows to the largest group asked for.

    The factors are cast once per step: the model calls :meth:`new_step` at the start of every forward, so that
    forward, its recomputations and its backward share them and none outlives the step; a changed parameter
    version (an in-place update) invalidates an entry too. Entries are keyed by (dtype, id of each A). A
    step's first request casts every group the previous step asked for, in one multi-tensor copy (and one
    multiply where a scale is not 1) into buffers kept for that group, instead of a few launches per group:
    a step is often bound by the CPU that issues its launches. (CUDA runs a multi-tensor copy as a few launches
    only where every target has its source's strides; the diagonal blocks of an NF4 group's B_block do not, so
    with NF4 groups the copy runs tensor by tensor. Copying the blocks apart cuts a 4-bit step's launches by
    about a tenth and is no faster a step.)"""

    def __init__(self, workspace_bytes: int | None = None):
        self.workspace_bytes = workspace_bytes
        self._factors: dict = {}  # key -> (the A/B parameters, their versions, _Factors)
        self._groups: dict = {}  # the groups cast since the last step: key -> (their LoRAs, dtype)
        self._casts: dict = {}  # key -> _GroupCast: where a known group is cast at each step
        self._fresh = False  # no group cast since new_step
        self._used: set = set()  # the keys asked for since new_step
        # (device, dtype) -> (flat buffer, {shape: a view of its first elements}); the views are made once
        self._workspaces: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, dict]] = {}

    def new_step(self) -> None:
        """Forget the cast factors; the groups the ending step asked for are the ones the next step casts at
        once."""
        for key in [k for k in self._groups if k not in self._used]:
            del self._groups[key]
            self._casts.pop(key, None)
        self._used.clear()
        self._fresh = True
        self._factors.clear()

    def factors(self, loras, dtype: torch.dtype) -> _Factors:
        """The factors of ``loras`` (one per projection of an input, None where it has no LoRA) in ``dtype``."""
        key = (dtype, *(id(l.A) if l is not None else None for l in loras))
        params = tuple(t for l in loras if l is not None for t in (l.A, l.B))
        versions = tuple(t._version for t in params)
        self._used.add(key)
        if self._fresh and key in self._groups:  # a step's first request: the previous step's groups, all at once
            self._fresh = False
            self._cast_known_groups()
        hit = self._factors.get(key)
        if hit is not None and hit[1] == versions and all(a is b for a, b in zip(hit[0], params)):
            return hit[2]
        factors = _cast_factors(loras, dtype)
        self._fresh = False
        self._factors[key] = (params, versions, factors)
        if factors.A is not None:
            self._groups[key] = (loras, dtype)
        return factors

    def _cast_known_groups(self) -> None:
        """Casts every known group into its buffers (its block-diagonal B too, once a step asked for it) and
        caches its factors."""
        sources, targets, scaled, scales = [], [], [], []  # scaled: indices into sources of the B's with s != 1
        repeats = []  # (index into sources, a second target of it: a diagonal block of B_block)
        for key, (loras, dtype) in self._groups.items():
            cast = self._casts.get(key)
            if cast is None or cast.loras is not loras:
                cast = self._casts[key] = _GroupCast(loras, dtype, cast)
            for source, target in cast.A_copies:
                sources.append(source)
                targets.append(target)
            for (source, target, s), block in zip(cast.B_copies, cast.block_views() or [None] * len(cast.B_copies)):
                if s != 1:
                    scaled.append(len(sources))
                    scales.append(s)
                if block is not None:
                    repeats.append((len(sources), block))
                sources.append(source)
                targets.append(target)
            self._factors[key] = (cast.params, tuple(t._version for t in cast.params), cast.factors)
        if scaled:  # s B in the parameters' precision, then rounded once, as _cast_factors does
            for i, product in zip(scaled, torch._foreach_mul([sources[i] for i in scaled], scales)):
                sources[i] = product
        for i, block in repeats:
            sources.append(sources[i])
            targets.append(block)
        torch._foreach_copy_(targets, sources)

    def held_bytes(self) -> int:
        """The bytes of the factor buffers kept between steps (each group's A, s B's and block-diagonal B)."""
        total = 0
        for cast in self._casts.values():
            block = cast.factors.block
            total += sum(t.nbytes for t in (cast.A, *cast.Bs, block) if t is not None)
        return total

    def fits(self, numel: int, dtype: torch.dtype) -> bool:
        """Whether a matrix of ``numel`` elements of ``dtype`` fits the workspace (always, where it has no set size)."""
        return self.workspace_bytes is None or numel * dtype.itemsize <= self.workspace_bytes

    def workspace(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A ``shape`` view into the buffer that every NF4 dequantization of this model on ``device`` shares
        (made at ``workspace_bytes`` or larger, grown as needed)."""
        key = (device, dtype)
        buf, views = self._workspaces.get(key) or (None, None)
        if buf is None or buf.numel() < shape.numel():
            numel = max(shape.numel(), (self.workspace_bytes or 0) // dtype.itemsize)
            buf, views = self._workspaces[key] = (torch.empty(numel, dtype=dtype, device=device), {})
        view = views.get(shape)
        if view is None:
            view = views[shape] = buf[: shape.numel()].view(shape)
        return view


def _out_features(p: Projection) -> int:
    state = getattr(p.weight, "quant_state", None)
    return (state.shape if state is not None else p.weight.shape)[0]


def _placeholder(x: torch.Tensor, p: Projection) -> torch.Tensor:
    """Stands for p's output in a graph-only forward: the right shape and dtype, no memory, no values."""
    return x.new_zeros(()).expand(*x.shape[:-1], _out_features(p))


def _columns_of_one_buffer(blocks) -> torch.Tensor | None:
    """The [N, sum o] tensor whose consecutive column blocks are ``blocks`` ([N, o_p] each), when they
    lie so in one buffer (the gradients the MLP writes over its side-by-side gate/up outputs), as a
    view; else None."""
    base = blocks[0]._base
    if base is None or any(b._base is not base or b.dim() != 2 for b in blocks):
        return None
    rows, total = blocks[0].shape[0], sum(b.shape[1] for b in blocks)
    offset = blocks[0].storage_offset()
    for b in blocks:
        if b.shape[0] != rows or b.stride() != (total, 1) or b.storage_offset() != offset:
            return None
        offset += b.shape[1]
    return base.as_strided((rows, total), (total, 1), blocks[0].storage_offset())


def _agree(projections) -> bool:
    """All or none of the projections have a LoRA, and all or none a bias: side by side, they then
    need one product each."""
    return len({p.lora is None for p in projections}) == 1 and len({p.bias is None for p in projections}) == 1


def _low_rank_first(x2: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor | None,
                    Bt: torch.Tensor | None) -> torch.Tensor:
    """x2 W^T + b + u Bt: the rank-r term (and the bias) first, into the output, then the base product added to it
    in the product's epilogue (beta = 1), so that the wide output is written once by each, never read and
    written again by a rank-r update after it."""
    if u is None:
        return F.linear(x2, W, bias)
    y = torch.mm(u, Bt) if bias is None else torch.addmm(bias, u, Bt)
    return y.addmm_(x2, W.t())


def _forward(x: torch.Tensor, projections,
             cache: LoraFactorCache | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """x [..., i] -> ([y_p [..., o_p]], x A^T [N, sum r] or None without LoRA); each y_p a view of a fresh tensor
    (callers may rotate them in place); x A^T for a backward to reuse. Written for few host calls per
    projection: the step is often bound by the CPU issuing it."""
    x2 = x.reshape(-1, x.shape[-1])
    f = _factors(projections, x.dtype, cache)
    xA = None if f.A is None else F.linear(x2, f.A)  # [N, sum r]: one matmul for every LoRA of this input
    W, weights = base_weights(projections, x.dtype, cache)
    if W is not None and _agree(projections):  # y = x W^T + b + (x A^T) B_block^T, then each projection's columns
        bias = None if projections[0].bias is None else torch.cat([p.bias for p in projections]).to(x.dtype)
        y = _low_rank_first(x2, W, bias, xA, None if xA is None else f.B_block_t)
        ys, start = [], 0
        for w in weights:
            ys.append(y[:, start:start + w.shape[0]].view(*x.shape[:-1], w.shape[0]))
            start += w.shape[0]
        return ys, xA
    ys = []
    for p, W, Bt, cols in zip(projections, weights, f.B_scaled_t, f.columns):
        bias = None if p.bias is None else p.bias.to(x.dtype)  # the bias itself where its dtype is x's
        y = _low_rank_first(x2, W, bias, None if Bt is None else xA[:, cols], Bt)
        ys.append(y.view(*x.shape[:-1], y.shape[-1]))
    return ys, xA


_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=) exists (torch >= 2.8)


def _product_in(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in ``dtype`` (the LoRA parameters', for their gradients): on a GPU, half-precision inputs give fp32
    straight from the product's fp32 accumulator (``out_dtype``: no cast after it, where this torch has it);
    elsewhere the product, cast."""
    if a.dtype == dtype:
        return a @ b
    if a.is_cuda and dtype == torch.float32 and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


def _backward(x2, projections, dys, need_dx: bool, cache: LoraFactorCache | None, xA=None):
    """For projections sharing the input x2 [N, i], given their dY's [N, o_p]:
    returns (dX or None, [(dA_p, dB_p)]), with dX = sum_p dY_p W_p + [s dY_p B_p]_p [A_p]_p.
    Where the weights lie side by side in one buffer, dY = [dY_p]_p (a view when the dY's do too) is
    multiplied once: dX = dY W + (dY B_block) A, and every dB_p is a block of dY^T (x A^T)."""
    grads, dy, lora_dx = _lora_grads(x2, projections, dys, cache, xA)
    return (_input_grad(projections, dys, dy, lora_dx, cache) if need_dx else None), grads


def _scaled_dy_b(f: _Factors, dys, dy) -> torch.Tensor | None:
    """[s dY_p B_p]_p, [N, sum r] (``dy``: the dY's side by side, or None), or None without LoRA."""
    if f.A is None:
        return None
    if dy is not None:
        return dy @ f.B_block
    dyBs = [d @ B for d, B in zip(dys, f.B_scaled) if B is not None]  # s dY B, [N, r] each
    return dyBs[0] if len(dyBs) == 1 else torch.cat(dyBs, 1)


def _lora_grads(x2, projections, dys, cache: LoraFactorCache | None, xA=None, dyB=None):
    """The part of :func:`_backward` that reads x2: ([(dA_p, dB_p)], dY side by side or None, the LoRA part of dX
    as its two factors ([s dY_p B_p]_p, [A_p]_p) or None), the last two for :func:`_input_grad`, which needs x2
    no more (a caller may free it in between). ``dyB``: :func:`_scaled_dy_b`'s product where the caller made it
    already (for dX, before x2 existed)."""
    f = _factors(projections, dys[0].dtype, cache)
    dy = None  # [dY_p]_p, when the weights lie side by side
    if _nf4_group(projections, dys[0].dtype, cache) is not None and _agree(projections):
        dy = _columns_of_one_buffer(dys)
        if dy is None:
            dy = torch.cat(dys, 1)
    grads = [(None, None)] * len(projections)
    if f.A is not None:
        if dyB is None:
            dyB = _scaled_dy_b(f, dys, dy)
        if xA is None:  # the forward's, where it ran; else computed here
            xA = F.linear(x2, f.A)
        A_dtype, B_dtype = next((p.lora.A.dtype, p.lora.B.dtype) for p in projections if p.lora is not None)
        dA_all = None
        if any(p.lora.A.requires_grad for p in projections if p.lora is not None):
            dA_all = _product_in(dyB.t(), x2, A_dtype)
        dB_all = None
        if dy is not None and any(p.lora.B.requires_grad for p in projections if p.lora is not None):
            dB_all = _product_in(dy.t(), xA, B_dtype)
        start, dBs = 0, {}  # dBs: projection index -> dB_p before its scale s and its cast
        for k, (p, d, cols) in enumerate(zip(projections, dys, f.columns)):
            rows = slice(start, start + d.shape[1])
            start = rows.stop
            if cols is None:
                continue
            dA = dA_all[cols].to(p.lora.A.dtype) if p.lora.A.requires_grad else None  # no-op unless dtypes mix
            if p.lora.B.requires_grad:
                dBs[k] = dB_all[rows, cols] if dB_all is not None else _product_in(d.t(), xA[:, cols], B_dtype)
            grads[k] = (dA, None)
        scaled = [k for k in dBs if f.scales[k] != 1]
        if scaled and dB_all is not None and len(set(f.scales)) == 1:  # one scale: all of dY^T (x A^T) at once
            dB_all.mul_(f.scales[0])
        elif scaled:  # in one multi-tensor multiply
            torch._foreach_mul_([dBs[k] for k in scaled], [f.scales[k] for k in scaled])
        for k, dB in dBs.items():
            grads[k] = (grads[k][0], dB.to(projections[k].lora.B.dtype))
    return grads, dy, (None if dyB is None else (dyB, f.A))


def _input_grad(projections, dys, dy, lora_dx, cache: LoraFactorCache | None) -> torch.Tensor:
    """dX = sum_p dY_p W_p + [s dY_p B_p]_p [A_p]_p, with ``dy`` and ``lora_dx`` as :func:`_lora_grads` returns
    them."""
    W, weights = base_weights(projections, dys[0].dtype, cache)
    dx = None if lora_dx is None else torch.mm(*lora_dx)  # the rank-r part first, as in _low_rank_first
    if dy is not None:
        return dy @ W if dx is None else dx.addmm_(dy, W)
    for Wp, d in zip(weights, dys):
        dx = d @ Wp if dx is None else dx.addmm_(d, Wp)
    return dx


def _unlinked(t: torch.Tensor) -> torch.Tensor:
    """t's memory as a tensor autograd does not know as a view. Side by side, Q, K and V are views of
    one product; RoPE then rotates Q and K in place, and autograd refuses any later use of views that
    one Function returned once their shared base has changed, V's too, though V's memory is untouched."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _flatten(projections):
    return [t for p in projections if p.lora is not None for t in (p.lora.A, p.lora.B)]


def _grads_by_input(projections, grads):
    """[(dA, dB) per projection] -> the gradients of ``_flatten(projections)``, in order."""
    return [g for p, (dA, dB) in zip(projections, grads) if p.lora is not None for g in (dA, dB)]


def _projected(x: torch.Tensor, projections, cache: LoraFactorCache | None):
    """(the projections' outputs, as tensors autograd does not link to one another where they lie side by side;
    x A^T as :func:`_forward` gives it)."""
    ys, xA = _forward(x, projections, cache)
    side_by_side = len(ys) > 1 and ys[0]._base is ys[1]._base
    return (tuple(_unlinked(y) for y in ys) if side_by_side else tuple(ys)), xA


class _LoRAProjections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, projections, graph_only, cache, *lora_params):
        ctx.projections, ctx.cache = projections, cache
        if graph_only:
            ctx.save_for_backward(x, None)
            return tuple(_placeholder(x, p) for p in projections)
        ys, xA = _projected(x, projections, cache)
        ctx.save_for_backward(x, xA)
        return ys

    @staticmethod
    def backward(ctx, *dys):
        x, xA = ctx.saved_tensors
        dys = [dy.reshape(-1, dy.shape[-1]) for dy in dys]
        dx, grads = _backward(x.reshape(-1, x.shape[-1]), ctx.projections, dys, ctx.needs_input_grad[0], ctx.cache,
                              xA)
        dx = None if dx is None else dx.view(x.shape)
        return (dx, None, None, None, *_grads_by_input(ctx.projections, grads))


def _outside_autocast(run, x, *args):
    """``run(x, *args)``; under autocast, in the autocast dtype with autocast off (these ops cast for themselves)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return run(x, *args)
    with torch.autocast(device, enabled=False):
        return run(x.to(torch.get_autocast_dtype(device)), *args)


def lora_projections(x: torch.Tensor, *projections: Projection, graph_only: bool = False,
                     cache: LoraFactorCache | None = None) -> tuple[torch.Tensor, ...]:
    """``(x W_p^T + b_p + s_p (x A_p^T) B_p^T for p in projections)``; x [..., i] -> [..., o_p] each. ``cache``:
    the calling model's :class:`LoraFactorCache` (None: the factors are cast at each call). Without grad mode (a
    checkpointed layer's forward) the products run without the autograd Function's host cost."""
    if not torch.is_grad_enabled() and not graph_only:  # no graph: side-by-side outputs may stay plain views
        return tuple(_outside_autocast(_forward, x, projections, cache)[0])
    return _outside_autocast(_LoRAProjections.apply, x, projections, graph_only, cache, *_flatten(projections))


# Tokens per chunk of the MLP where it runs in chunks (see the module's docstring): the products stay large
# enough to run at full speed
MLP_CHUNK_ROWS = 4096


def _row_chunks(n: int, rows: int) -> list[slice]:
    """n rows as the fewest chunks of at most ``rows``, split evenly."""
    count = max(1, -(-n // rows))
    size = max(1, -(-n // count))
    return [slice(start, min(n, start + size)) for start in range(0, n, size)] or [slice(0, 0)]


def _mlp_forward(x: torch.Tensor, glu: GLU, gate: Projection, up: Projection, down: Projection,
                 cache: LoraFactorCache | None, chunk_rows: int) -> torch.Tensor:
    """down(glu(gate(x), up(x))) for x [..., i], without autograd, ``chunk_rows`` tokens at a time."""
    x2 = x.reshape(-1, x.shape[-1])
    chunks = _row_chunks(x2.shape[0], chunk_rows)
    if len(chunks) == 1:
        return _mlp_rows(x, glu, gate, up, down, cache)
    out = x2.new_empty(x2.shape[0], _out_features(down))
    for rows in chunks:
        out[rows] = _mlp_rows(x2[rows], glu, gate, up, down, cache)
    return out.view(*x.shape[:-1], -1)


def _mlp_rows(x: torch.Tensor, glu: GLU, gate: Projection, up: Projection, down: Projection,
              cache: LoraFactorCache | None) -> torch.Tensor:
    """down(glu(gate(x), up(x))) in one piece, without autograd."""
    (g, u), _ = _forward(x, (gate, up), cache)
    return _forward(glu.forward(g, u), (down,), cache)[0][0]


def _accumulated(total: list | None, grads: list) -> list:
    return grads if total is None else [a if b is None else a.add_(b) for a, b in zip(total, grads)]


class _LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, glu, gate, up, down, graph_only, cache, chunk_rows, *lora_params):
        ctx.glu, ctx.projections, ctx.cache, ctx.chunk_rows, ctx.spent = glu, (gate, up, down), cache, chunk_rows, False
        if graph_only:  # the backward computes gate and up itself, a chunk at a time
            ctx.save_for_backward(x)
            return _placeholder(x, down)
        (g, u), xA = _forward(x, (gate, up), cache)
        (y,), hA = _forward(glu.forward(g, u), (down,), cache)
        ctx.save_for_backward(x, g, u, xA, hA)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, *pre = ctx.saved_tensors  # pre: the forward's gate, up, x A^T, h A_down^T, unless it ran graph-only
        if pre and ctx.spent:  # the first backward wrote its GLU gradients over the saved g and u
            raise RuntimeError("lora_mlp's backward reuses its saved pre-activations as gradient buffers; "
                               "a second backward (retain_graph=True) needs a second forward")
        ctx.spent = True
        gate, up, down = ctx.projections
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        pre = [None if t is None else t.reshape(-1, t.shape[-1]) for t in pre]
        chunks = _row_chunks(x2.shape[0], ctx.chunk_rows)
        need_dx = ctx.needs_input_grad[0]
        dx = x2.new_empty(x2.shape) if need_dx and len(chunks) > 1 else None
        grads = None
        for rows in chunks:
            if pre:
                g, u, xA, hA = [None if t is None else t[rows] for t in pre]
            else:
                ((g, u), xA), hA = _forward(x2[rows], (gate, up), ctx.cache), None
            dy_rows = dy2[rows]
            f = _factors((down,), dy_rows.dtype, ctx.cache)
            dyB = _scaled_dy_b(f, [dy_rows], None)  # down is alone: its dY is never side by side
            dh = _input_grad((down,), [dy_rows], None, None if dyB is None else (dyB, f.A), ctx.cache)
            # the GLU's gradients over g and u (not needed any more), its output h over dh (read here first)
            dg, du = ctx.glu.backward(dh, g, u, dgate=g, dup=u, h=dh)
            (down_grads,), _, _ = _lora_grads(dh, (down,), [dy_rows], ctx.cache, hA, dyB)  # dh holds h now
            del dh
            dx_rows, gate_up_grads = _backward(x2[rows], (gate, up), [dg, du], need_dx, ctx.cache, xA)
            grads = _accumulated(grads, _grads_by_input(ctx.projections, [*gate_up_grads, down_grads]))
            if dx is None:
                dx = dx_rows
            elif need_dx:
                dx[rows] = dx_rows
        dx = None if dx is None else dx.view(x.shape)
        return (dx, None, None, None, None, None, None, None, *grads)


def lora_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection, glu: GLU,
             graph_only: bool = False, cache: LoraFactorCache | None = None,
             chunk_rows: int = MLP_CHUNK_ROWS) -> torch.Tensor:
    """``down(glu(gate(x), up(x)))`` with LoRA on each projection; ``cache`` as in :func:`lora_projections`;
    ``chunk_rows``: the tokens of one chunk where the MLP runs in chunks (see the module's docstring)."""
    if not torch.is_grad_enabled():
        return _outside_autocast(_mlp_forward, x, glu, gate, up, down, cache, chunk_rows)
    return _outside_autocast(_LoRAMLP.apply, x, glu, gate, up, down, graph_only, cache, chunk_rows,
                             *_flatten((gate, up, down)))


def reference(x: torch.Tensor, p: Projection) -> torch.Tensor:
    """The math of one projection in plain PyTorch autograd (the test oracle)."""
    W = base_weight(p.weight, x.dtype).clone()
    y = x @ W.t()
    if p.bias is not None:
        y = y + p.bias.to(y.dtype)
    if p.lora is not None:
        y = y + p.lora.scale * (x @ p.lora.A.to(x.dtype).t()) @ p.lora.B.to(x.dtype).t()
    return y
