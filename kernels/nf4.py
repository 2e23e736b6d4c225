"""4-bit NF4 dequantize in bitsandbytes' layout, bit-exact with ``bitsandbytes.functional.dequantize_4bit``.

Layout (bitsandbytes ``quantize_4bit``): the weight, flattened row-major, is cut into blocks of
``blocksize`` (64) values; each byte holds two 4-bit codes, the element at the even index in the high
nibble. Element ``e`` is ``code[nibble(e)] * absmax[e // blocksize]``, computed in fp32 and rounded
once to the output dtype. With double quantization (``compress_statistics=True``) the absmax vector is
itself stored as uint8 codes in blocks of 256: ``absmax[j] = code2[q[j]] * absmax2[j // 256] + offset``
(a product rounded to fp32, then the sum rounded to fp32: the kernel is compiled without FMA fusion so
that it rounds exactly as bitsandbytes does).

bitsandbytes 0.50.2's own CPU dequantize (its native path, taken when the last dim is even) does not
follow this layout when the width is not a multiple of the blocksize (it disagrees with its own
quantizer there); its generic and CUDA paths do, and so does this kernel.

One launch dequantizes the absmax and the weights together; the output can be a caller-given buffer
(larger than needed is fine) so that one buffer serves every layer.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from fastbench.autotune.lookup import config_for
from fastbench.autotune.spec import OpSpec, TuneCase
from fastbench.kernels._tensors import cdiv, dtype_name


@triton.jit
def _bits16(values, OUT_BF16: tl.constexpr):
    """fp32 values -> their bf16 (rounded to nearest even by hand: the interpreter's cast truncates) or
    fp16 bit patterns, in the low half of a uint32."""
    if OUT_BF16:
        bits = values.to(tl.uint32, bitcast=True)
        return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return values.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def _dequantize_blocks(program, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
                       numel, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       BLOCKS: tl.constexpr, PAIRS: tl.constexpr, OUT_BF16: tl.constexpr):
    """Program ``program`` of one weight: a [BLOCKS, BLOCKSIZE / 2] tile of packed bytes becomes a
    [BLOCKS, BLOCKSIZE] tile of outputs, each row scaled by its block's absmax.

    PAIRS (16-bit outputs, even numel): out_ptr is the output seen as 32-bit words, and each byte's two
    values are stored as one word (the even element in the low half, little-endian), one store per
    byte instead of interleaving the two nibbles' values in registers."""
    block = program * BLOCKS + tl.arange(0, BLOCKS)
    in_range = block * BLOCKSIZE < numel
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=in_range, other=0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=in_range, other=0)
    byte = block[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    # PAIRS: numel is even, so numel // 2 bytes; a bound Triton knows to be aligned (numel's divisibility
    # carries over, (numel + 1) // 2's does not) lets it load the packed bytes as vectors, not byte by byte
    n_bytes = numel // 2 if PAIRS else (numel + 1) // 2
    packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    high = tl.load(code_ptr + (packed >> 4)) * scale[:, None]  # the even element: high nibble
    low = tl.load(code_ptr + (packed & 15)) * scale[:, None]
    if PAIRS:
        word = _bits16(high, OUT_BF16) | (_bits16(low, OUT_BF16) << 16)
        tl.store(out_ptr + byte, word.to(tl.int32, bitcast=True), mask=byte < numel // 2)
    else:
        values = tl.reshape(tl.join(high, low), (BLOCKS, BLOCKSIZE))
        offs = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        if OUT_BF16:
            values = _bits16(values, OUT_BF16).to(tl.int16)
        tl.store(out_ptr + offs, values.to(out_ptr.dtype.element_ty), mask=offs < numel)


@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, numel,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCKS: tl.constexpr,
    PAIRS: tl.constexpr, OUT_BF16: tl.constexpr,
):
    """One weight: each program dequantizes BLOCKS absmax blocks."""
    _dequantize_blocks(tl.program_id(0).to(tl.int64), packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr,
                       offset_ptr, out_ptr, numel, BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCKS, PAIRS, OUT_BF16)


@triton.jit
def _dequantize_nf4_group_kernel(
    code_ptr, code2_ptr, out_ptr,
    packed0, absmax0, scale2_0, offset0, numel0,
    packed1, absmax1, scale2_1, offset1, numel1, start1,
    packed2, absmax2, scale2_2, offset2, numel2, start2,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCKS: tl.constexpr,
    PAIRS: tl.constexpr, OUT_BF16: tl.constexpr,
):
    """Two or three weights (the third may be empty: numel2 = 0) of one table and blocksize, stacked in
    one output: weight g's values start at element (or 32-bit word, PAIRS) ``start_g``; absmax_g and
    scale2_g/offset_g are its (nested) absmax as in the one-weight kernel. The first cdiv(numel0, per
    program) programs take weight 0, the next ones weight 1, the rest weight 2."""
    program = tl.program_id(0).to(tl.int64)
    n0 = tl.cdiv(numel0, BLOCKSIZE * BLOCKS)
    n1 = tl.cdiv(numel1, BLOCKSIZE * BLOCKS)
    if program < n0:
        _dequantize_blocks(program, packed0, absmax0, code_ptr, scale2_0, code2_ptr, offset0, out_ptr,
                           numel0, BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCKS, PAIRS, OUT_BF16)
    elif program < n0 + n1:
        _dequantize_blocks(program - n0, packed1, absmax1, code_ptr, scale2_1, code2_ptr, offset1,
                           out_ptr + start1, numel1, BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCKS, PAIRS, OUT_BF16)
    else:
        _dequantize_blocks(program - n0 - n1, packed2, absmax2, code_ptr, scale2_2, code2_ptr, offset2,
                           out_ptr + start2, numel2, BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCKS, PAIRS, OUT_BF16)


def problem_key(shape, dtype: torch.dtype, blocksize: int, nested: bool) -> dict:
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return {"rows": int(rows), "cols": int(shape[-1]), "dtype": dtype_name(dtype),
            "blocksize": int(blocksize), "nested": bool(nested)}


# output tensor -> its 32/16-bit store view, made once per output object (the fused path passes the same
# workspace views every step); weak keys: an entry goes with its tensor
_store_views = WeakIdKeyDictionary()


def _store_view(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out``'s memory seen as ``dtype`` (int32 words for paired stores, int16 for bf16 halves)."""
    view = _store_views.get(out)
    if view is None or view.dtype != dtype:
        flat = out.view(-1) if out.dim() > 1 and out.shape[-1] % 2 else out
        view = _store_views[out] = flat.view(dtype)
    return view


def _kernel_stats(stats, code, nested: bool):
    """(absmax or its codes, nested scales, nested table, offset, nested blocksize) as the kernels take
    them; without nesting the nested arguments are unused placeholders."""
    return stats if nested else (stats, stats, code, stats, 1)


def _store_target(flat_out, numels) -> tuple[torch.Tensor, bool, bool]:
    """(what the kernel stores into, PAIRS, OUT_BF16) for a contiguous output holding weights of
    ``numels`` elements each: 16-bit outputs of even counts at a 4-byte-aligned address take one 32-bit
    store per packed byte; bf16 is stored as its 16 bits."""
    bf16 = flat_out.dtype == torch.bfloat16
    pairs = flat_out.element_size() == 2 and all(n % 2 == 0 for n in numels) and flat_out.data_ptr() % 4 == 0
    if pairs or bf16:
        flat_out = _store_view(flat_out, torch.int32 if pairs else torch.int16)
    return flat_out, pairs, bf16


def _arguments(packed, absmax, code, flat_out, numel, blocksize, nested, config):
    """(kernel, grid, args, kwargs) of one weight's dequantize launch; ``flat_out``: the contiguous output,
    exactly ``numel`` elements (1-D, or any shape)."""
    absmax_q, absmax2, code2, offset, blocksize2 = _kernel_stats(absmax, code, nested)
    blocks = max(1, config["BLOCK"] // blocksize)  # BLOCK: output elements per program
    grid = (cdiv(cdiv(numel, blocksize), blocks),)
    flat_out, pairs, bf16 = _store_target(flat_out, (numel,))
    return (_dequantize_nf4_kernel, grid, (packed, absmax_q, code, absmax2, code2, offset, flat_out, numel),
            dict(BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, NESTED=nested, BLOCKS=blocks, PAIRS=pairs,
                 OUT_BF16=bf16, num_warps=config["num_warps"], num_stages=config["num_stages"],
                 enable_fp_fusion=False))


def _launch(*arguments) -> None:
    """One weight's dequantize launch (the arguments of :func:`_arguments`)."""
    kernel, grid, args, kwargs = _arguments(*arguments)
    kernel[grid](*args, **kwargs)


_LAUNCH_ATTR = "_fastbench_nf4_launch"  # on a weight's (a group's first weight's) quant state: its last launch


def _launch_again(state, plans: tuple, flat: torch.Tensor, arguments) -> None:
    """Launches with ``arguments()``, the (kernel, grid, args, kwargs) of ``plans`` into ``flat``, kept on
    ``state`` (None: not kept): the next launch of the same plans into the same output object launches them as
    they are (the fused path dequantizes each weight into one workspace view a few times per step, and building
    the arguments is host time). A plan is rebuilt when its weight's data moved (:func:`_weight_plan`), and so
    then are these arguments."""
    held = None if state is None else getattr(state, _LAUNCH_ATTR, None)
    if held is None or held[1] is not flat or len(held[0]) != len(plans) \
            or any(a is not b for a, b in zip(held[0], plans)):
        held = (plans, flat, *arguments())
        if state is not None:
            setattr(state, _LAUNCH_ATTR, held)
    kernel, grid, args, kwargs = held[2:]
    kernel[grid](*args, **kwargs)


def _output_buffer(out, shape, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(where the kernel writes, the result): ``out`` itself twice when it already is a contiguous
    ``shape`` tensor, else a flat slice of its first prod(shape) elements (or of a new buffer) and that
    slice viewed as ``shape``."""
    numel = math.prod(shape)
    if out is None:
        flat = torch.empty(numel, dtype=dtype, device=device)
    elif out.shape == shape and out.dtype == dtype and out.device == device and out.is_contiguous():
        return out, out  # no views at all: the fused path passes views it made once
    else:
        if out.dtype != dtype or not out.is_contiguous() or out.numel() < numel or out.device != device:
            raise ValueError(f"out must be a contiguous {dtype} tensor on {device} with at least {numel} "
                             f"elements, got {out.dtype} {tuple(out.shape)} on {out.device}")
        flat = out if out.dim() == 1 else out.view(-1)
        if flat.numel() != numel:
            flat = flat[:numel]
    return flat, flat.view(shape)


class _Plan(NamedTuple):
    """Everything a dequantize launch needs but the output buffer, checked and converted once."""
    packed: torch.Tensor  # flat uint8
    stats: object  # fp32 absmax, or (uint8 codes, fp32 absmax2, fp32 code2, 0-d offset, blocksize2)
    code: torch.Tensor  # fp32 table
    shape: tuple
    numel: int
    blocksize: int
    nested: bool
    dtype: torch.dtype
    problem: dict


def _plan(packed, absmax, code, *, shape, blocksize, absmax_code, absmax_scale, absmax_offset,
          absmax_blocksize, dtype) -> _Plan:
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    nested = absmax.dtype == torch.uint8
    if nested and (absmax_code is None or absmax_scale is None or absmax_offset is None):
        raise ValueError("uint8 absmax (double quantization) needs absmax_code, absmax_scale, absmax_offset")
    if blocksize < 4 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 4, got {blocksize}")
    packed = packed.contiguous().view(torch.uint8).reshape(-1)
    if packed.numel() < (numel + 1) // 2:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} 4-bit values")
    if code is None:
        from bitsandbytes.functional import get_4bit_type

        code = get_4bit_type("nf4", device=packed.device)
    if nested:
        offset = torch.as_tensor(absmax_offset, dtype=torch.float32, device=packed.device).reshape(())
        stats = (absmax, absmax_scale.float(), absmax_code.float(), offset, absmax_blocksize)
    else:
        stats = absmax.float()
    return _Plan(packed, stats, code.float(), shape, numel, blocksize, nested, dtype,
                 problem_key(shape, dtype, blocksize, nested))


def _run(plan: _Plan, out, state=None) -> torch.Tensor:
    """Dequantizes ``plan`` into ``out`` (or a new tensor); with ``state``, the weight's quant state, its launch
    is kept there for the next one (:func:`_launch_again`)."""
    flat, result = _output_buffer(out, plan.shape, plan.dtype, plan.packed.device)

    def arguments():
        return _arguments(plan.packed, plan.stats, plan.code, flat, plan.numel, plan.blocksize, plan.nested,
                          config_for(SPEC, "fwd", plan.problem))

    _launch_again(state, (plan,), flat, arguments)
    return result


def _group_arguments(plans, flat_out, config):
    """(kernel, grid, args, kwargs) of two or three weights' plans (one table, blocksize, nesting and dtype)
    dequantized into ``flat_out`` (contiguous, exactly their total number of elements), stacked."""
    numels = [p.numel for p in plans]
    blocksize = plans[0].blocksize
    blocks = max(1, config["BLOCK"] // blocksize)
    grid = (sum(cdiv(cdiv(n, blocksize), blocks) for n in numels),)
    flat_out, pairs, bf16 = _store_target(flat_out, numels)
    unit = 2 if pairs else 1
    stats = [_kernel_stats(p.stats, p.code, p.nested) for p in plans]
    parts = [(p.packed, st[0], st[1], st[3], p.numel) for p, st in zip(plans, stats)]
    if len(parts) == 2:
        parts.append((*parts[0][:4], 0))  # an empty third weight: no program reaches it
    starts = (numels[0] // unit, (numels[0] + numels[1]) // unit)
    (p0, a0, s0, o0, n0), (p1, a1, s1, o1, n1), (p2, a2, s2, o2, n2) = parts
    code2, blocksize2 = stats[0][2], stats[0][4]
    return (_dequantize_nf4_group_kernel, grid,
            (plans[0].code, code2, flat_out, p0, a0, s0, o0, n0, p1, a1, s1, o1, n1, starts[0],
             p2, a2, s2, o2, n2, starts[1]),
            dict(BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, NESTED=plans[0].nested, BLOCKS=blocks, PAIRS=pairs,
                 OUT_BF16=bf16, num_warps=config["num_warps"], num_stages=config["num_stages"],
                 enable_fp_fusion=False))


def dequantize_nf4(packed, absmax, code=None, *, shape, blocksize=64, absmax_code=None, absmax_scale=None,
                   absmax_offset=None, absmax_blocksize=256, out=None, dtype=torch.bfloat16):
    """Dequantize bitsandbytes-packed 4-bit codes to a ``shape`` tensor of ``dtype``.

    ``packed``: the packed bytes (any storage dtype; read as uint8). ``absmax``: fp32 per-block scales,
    or, double quantized, their uint8 codes, with ``absmax_code`` (256 fp32 values), ``absmax_scale``
    (fp32, one per ``absmax_blocksize`` codes) and ``absmax_offset`` (a 0-d fp32 tensor).
    ``code``: the 16-entry fp32 table (default: bitsandbytes' NF4 table). ``out``: an optional
    contiguous buffer of ``dtype`` with at least ``prod(shape)`` elements (any shape; a flat one costs
    the fewest views); the result is a view of its first elements.
    """
    return _run(_plan(packed, absmax, code, shape=shape, blocksize=blocksize, absmax_code=absmax_code,
                      absmax_scale=absmax_scale, absmax_offset=absmax_offset, absmax_blocksize=absmax_blocksize,
                      dtype=dtype), out)


_PLAN_ATTR = "_fastbench_nf4_plan"


def _weight_plan(weight, state) -> _Plan:
    """The checked launch arguments of a weight, kept on its quant state (training dequantizes each
    weight a few times per step) and rebuilt when the packed data or the state's tensors moved."""
    tensors = (weight, state.absmax, *((state.offset, state.state2.absmax) if state.nested else ()))
    where = tuple(t.data_ptr() if isinstance(t, torch.Tensor) else t for t in tensors)
    cached = getattr(state, _PLAN_ATTR, None)
    if cached is not None and cached[0] == where and cached[1].dtype == weight_dtype(state):
        return cached[1]
    packed = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    plan = _plan(**weight_arguments(packed, state))
    setattr(state, _PLAN_ATTR, (where, plan))
    return plan


def weight_dtype(state) -> torch.dtype:
    """The dtype a bitsandbytes weight dequantizes to (the one it had before a CPU repacking)."""
    if getattr(state, "packing_format_for_cpu", False):
        return getattr(state, "original_dtype", state.dtype)
    return state.dtype


def weight_arguments(packed: torch.Tensor, state) -> dict:
    """The arguments of :func:`dequantize_nf4` / :func:`reference` for a bitsandbytes weight's packed
    data and quant state.

    bitsandbytes rewrites a 4-bit weight into its CPU kernel's layout when it runs an eval-mode forward
    on a CPU with AVX512-BF16 (``quant_state.packing_format_for_cpu``): per 32 output rows and pair of
    columns, the 64 codes of a [32 rows, 2 columns] tile go to 32 bytes, tile element j in the low nibble
    of byte j and element 32 + j in its high nibble; absmax becomes bf16, transposed to [cols/blocksize,
    rows], double quantization undone. That layout is read back here to the standard one (two codes per
    byte, the first in the high nibble, row-major), with those bf16 absmax values: the weight the model
    computes with since then."""
    if getattr(state, "packing_format_for_cpu", False):
        rows, cols = state.shape
        tiles = packed.contiguous().view(torch.uint8).reshape(-1, 32)
        codes = torch.cat([tiles & 15, tiles >> 4], -1).reshape(rows // 32, cols // 2, 32, 2)
        codes = codes.transpose(1, 2).reshape(-1, 2)
        standard = (codes[:, 0] << 4) | codes[:, 1]
        absmax = state.absmax.t().reshape(-1).float()
        return dict(packed=standard, absmax=absmax, code=state.code, shape=state.shape, blocksize=state.blocksize,
                    absmax_code=None, absmax_scale=None, absmax_offset=None, absmax_blocksize=256,
                    dtype=weight_dtype(state))
    s2 = state.state2 if state.nested else None
    return dict(packed=packed, absmax=state.absmax, code=state.code, shape=state.shape, blocksize=state.blocksize,
                absmax_code=s2.code if s2 else None, absmax_scale=s2.absmax if s2 else None,
                absmax_offset=state.offset if s2 else None, absmax_blocksize=s2.blocksize if s2 else 256,
                dtype=state.dtype)


def dequantize_nf4_weight(weight, out=None, *, quant_state=None):
    """Dequantize a bitsandbytes ``Params4bit`` (or its packed data plus ``quant_state``) to a tensor of
    ``quant_state.shape`` in ``quant_state.dtype``; bit-exact with ``dequantize_4bit``."""
    state = quant_state if quant_state is not None else weight.quant_state
    return _run(_weight_plan(weight, state), out, state)


def _groupable(plans) -> bool:
    """Whether these weights can share one launch: 2 or 3 of them, one 4-bit table, blocksize, nesting
    (and nested table and blocksize), dtype and device."""
    first = plans[0]
    if not 2 <= len(plans) <= 3:
        return False
    if not all(p.blocksize == first.blocksize and p.nested == first.nested and p.dtype == first.dtype
               and p.packed.device == first.packed.device and torch.equal(p.code, first.code) for p in plans):
        return False
    return not first.nested or all(p.stats[4] == first.stats[4] and torch.equal(p.stats[2], first.stats[2])
                                   for p in plans)


_GROUP_ATTR = "_fastbench_nf4_group"  # on the first weight's quant state: (the group's plans, groupable)
_group_views = WeakIdKeyDictionary()  # output tensor -> (the weights' shapes, each one's view of it)


def dequantize_nf4_weights(weights, out=None, *, quant_states=None) -> list[torch.Tensor]:
    """Several ``Params4bit`` weights (or packed data with ``quant_states``) stacked in one output,
    weight g's values right after weight g-1's. Two or three weights sharing their tables, blocksize and
    dtype take one launch (the fused path's Q/K/V and gate/up: fewer launches, and the small k/v
    matrices do not run alone); others one launch each. Bit-exact with ``dequantize_4bit``.

    ``out``: contiguous, at least the total number of elements (the fused path passes a [sum of rows,
    cols] view, the same object every step). Returns each weight's view of it, in its own shape."""
    states = quant_states or [w.quant_state for w in weights]
    plans = [_weight_plan(w, st) for w, st in zip(weights, states)]
    total = sum(p.numel for p in plans)
    shape = tuple(out.shape) if out is not None and out.numel() == total else (total,)
    flat, whole = _output_buffer(out, shape, plans[0].dtype, plans[0].packed.device)
    shapes = tuple(p.shape for p in plans)
    views = _group_views.get(whole)
    if views is None or views[0] != shapes:
        flat_whole, start, made = whole.view(-1), 0, []
        for p in plans:
            made.append(flat_whole[start:start + p.numel].view(p.shape))
            start += p.numel
        views = _group_views[whole] = (shapes, made)
    group = getattr(states[0], _GROUP_ATTR, None)
    if group is None or len(group[0]) != len(plans) or any(a is not b for a, b in zip(group[0], plans)):
        group = (tuple(plans), _groupable(plans))
        setattr(states[0], _GROUP_ATTR, group)
    if not group[1]:
        for p, view, st in zip(plans, views[1], states):
            _run(p, view, st)
        return views[1]

    def arguments():
        cols = plans[0].shape[-1]
        rows = (total // cols,) if all(p.shape[-1] == cols for p in plans) else ()
        problem = problem_key((*rows, cols) if rows else (total,), plans[0].dtype, plans[0].blocksize,
                              plans[0].nested)
        return _group_arguments(plans, flat, config_for(SPEC, "fwd", problem))

    _launch_again(states[0], group[0], flat, arguments)
    return views[1]


def reference(packed, absmax, code, *, shape, blocksize=64, absmax_code=None, absmax_scale=None,
              absmax_offset=None, absmax_blocksize=256, dtype=torch.bfloat16):
    """The same math in PyTorch (same argument meanings as :func:`dequantize_nf4`)."""
    numel = math.prod(shape)
    if absmax.dtype == torch.uint8:
        scale2 = absmax_scale.float().repeat_interleave(absmax_blocksize)[: absmax.numel()]
        absmax = absmax_code.float()[absmax.long()] * scale2 + absmax_offset
    packed = packed.contiguous().view(torch.uint8).reshape(-1).long()
    nibbles = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[:numel]
    values = code.float()[nibbles] * absmax.float().repeat_interleave(blocksize)[:numel]
    return values.to(dtype).reshape(shape)


# --- launch configs ------------------------------------------------------------------------------

# BLOCK: output elements per program (whole absmax blocks)
_CANDIDATES = [{"BLOCK": b, "num_warps": w, "num_stages": 1}
               for b in (512, 1024, 2048, 4096, 8192) for w in (2, 4, 8) if b // (32 * w) >= 4]


def heuristic(pass_name, problem):
    return {"BLOCK": 2048, "num_warps": 4, "num_stages": 1}


def _projection_shapes(model_config):
    c = model_config
    hidden, inter = c.hidden_size, c.intermediate_size
    head_dim = getattr(c, "head_dim", None) or hidden // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    # q, k, v, o, gate, up, down as nn.Linear weights [out_features, in_features]
    return [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inter, hidden), (inter, hidden), (hidden, inter)]


def problems(model_config, tokens, dtype):
    """One dequantize per distinct projection shape, and per stacked group of the fused path (Q/K/V and
    gate/up, tuned as one weight of their total rows); the token count does not enter."""
    q, k, v, o, gate, up, down = _projection_shapes(model_config)
    groups = [(q[0] + k[0] + v[0], q[1]), (gate[0] + up[0], gate[1])]
    keys = [problem_key(s, dtype, 64, True) for s in [q, k, v, o, gate, up, down, *groups]]
    unique = {tuple(sorted(k.items())): k for k in keys}
    return [("fwd", k) for k in unique.values()]


def tune_case(pass_name, problem, device):
    import bitsandbytes.functional as bnbf

    shape = (problem["rows"], problem["cols"])
    dtype = getattr(torch, problem["dtype"])
    weight = torch.randn(shape, dtype=dtype, device=device)
    packed, state = bnbf.quantize_4bit(weight, blocksize=problem["blocksize"], quant_type="nf4",
                                       compress_statistics=problem["nested"])
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)  # poisoned once: runs are timed
    if state.nested:
        s2 = state.state2
        stats = (state.absmax, s2.absmax, s2.code, state.offset.reshape(()), s2.blocksize)
        expected = reference(packed, state.absmax, state.code, shape=shape, blocksize=state.blocksize,
                             absmax_code=s2.code, absmax_scale=s2.absmax, absmax_offset=state.offset,
                             absmax_blocksize=s2.blocksize, dtype=dtype)
    else:
        stats = state.absmax
        expected = reference(packed, state.absmax, state.code, shape=shape, blocksize=state.blocksize, dtype=dtype)
    numel = math.prod(shape)

    def run(config):
        _launch(packed.view(-1), stats, state.code, out.view(-1), numel, state.blocksize, state.nested, config)
        return out

    return TuneCase(run=run, expected=expected, tolerance=0.0)


SPEC = OpSpec(name="nf4_dequantize", candidates={"fwd": _CANDIDATES}, heuristic=heuristic,
              tune_case=tune_case, problems=problems,
              kernels=(_dequantize_nf4_kernel, _dequantize_nf4_group_kernel, _dequantize_blocks, _bits16))
