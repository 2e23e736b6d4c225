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
def _dequantize_nf4_kernel(
    packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, numel,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCKS: tl.constexpr,
    PAIRS: tl.constexpr, OUT_BF16: tl.constexpr,
):
    """Each program dequantizes BLOCKS absmax blocks: a [BLOCKS, BLOCKSIZE / 2] tile of packed bytes
    becomes a [BLOCKS, BLOCKSIZE] tile of outputs, each row scaled by its block's absmax.

    PAIRS (16-bit outputs, even numel): out_ptr is the output seen as 32-bit words, and each byte's two
    values are stored as one word (the even element in the low half, little-endian), one store per
    byte instead of interleaving the two nibbles' values in registers."""
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
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


def _launch(packed, absmax, code, flat_out, numel, blocksize, nested, config):
    """``flat_out``: the contiguous output, exactly ``numel`` elements (1-D, or any shape)."""
    absmax_q, absmax2, code2, offset, blocksize2 = absmax if nested else (absmax, absmax, code, absmax, 1)
    blocks = max(1, config["BLOCK"] // blocksize)  # BLOCK: output elements per program
    grid = (cdiv(cdiv(numel, blocksize), blocks),)
    bf16 = flat_out.dtype == torch.bfloat16
    pairs = flat_out.element_size() == 2 and numel % 2 == 0 and flat_out.data_ptr() % 4 == 0
    if pairs or bf16:
        flat_out = _store_view(flat_out, torch.int32 if pairs else torch.int16)
    _dequantize_nf4_kernel[grid](
        packed, absmax_q, code, absmax2, code2, offset, flat_out, numel,
        BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, NESTED=nested, BLOCKS=blocks, PAIRS=pairs, OUT_BF16=bf16,
        num_warps=config["num_warps"], num_stages=config["num_stages"], enable_fp_fusion=False,
    )


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


def _run(plan: _Plan, out) -> torch.Tensor:
    flat, result = _output_buffer(out, plan.shape, plan.dtype, plan.packed.device)
    config = config_for(SPEC, "fwd", plan.problem)
    _launch(plan.packed, plan.stats, plan.code, flat, plan.numel, plan.blocksize, plan.nested, config)
    return result


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


def dequantize_nf4_weight(weight, out=None, *, quant_state=None):
    """Dequantize a bitsandbytes ``Params4bit`` (or its packed data plus ``quant_state``) to a tensor of
    ``quant_state.shape`` in ``quant_state.dtype``; bit-exact with ``dequantize_4bit``.

    The checked launch arguments are kept on the quant state (training dequantizes each weight a few
    times per step) and rebuilt when the packed data or the state's tensors moved."""
    state = quant_state if quant_state is not None else weight.quant_state
    tensors = (weight, state.absmax, *((state.offset, state.state2.absmax) if state.nested else ()))
    where = tuple(t.data_ptr() if isinstance(t, torch.Tensor) else t for t in tensors)
    cached = getattr(state, _PLAN_ATTR, None)
    if cached is not None and cached[0] == where and cached[1].dtype == state.dtype:
        return _run(cached[1], out)
    packed = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    s2 = state.state2 if state.nested else None
    plan = _plan(packed, state.absmax, state.code, shape=state.shape, blocksize=state.blocksize,
                 absmax_code=s2.code if s2 else None, absmax_scale=s2.absmax if s2 else None,
                 absmax_offset=state.offset if s2 else None, absmax_blocksize=s2.blocksize if s2 else 256,
                 dtype=state.dtype)
    setattr(state, _PLAN_ATTR, (where, plan))
    return _run(plan, out)


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
    """One dequantize per distinct projection shape; the token count does not enter."""
    keys = [problem_key(s, dtype, 64, True) for s in _projection_shapes(model_config)]
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
              tune_case=tune_case, problems=problems, kernels=(_dequantize_nf4_kernel, _bits16))
