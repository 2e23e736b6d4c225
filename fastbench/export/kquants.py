"""The k-quant block formats of GGUF (Q3_K, Q4_K, Q5_K, Q6_K): fp32 rows to the bytes llama.cpp reads,
in torch on the tensor's device (vectorised over all blocks; the only Python loops run over candidates).

A row is cut into super-blocks of 256 values; each stores an fp16 scale ``d`` (and ``dmin``) and, per
sub-block, small integer scales (and mins). A value is rebuilt as

    Q4_K, Q5_K   8 sub-blocks of 32, q in [0, 15] / [0, 31], 6-bit sc, m:   x = d*sc_j*q - dmin*m_j
    Q3_K        16 sub-blocks of 16, q in [-4, 3], 6-bit signed sc:         x = d*sc_j*q
    Q6_K        16 sub-blocks of 16, q in [-32, 31], 8-bit signed sc:       x = d*sc_j*q

Quantizing minimises the squared error in three steps:
1. per sub-block, a search over candidate scales: each rounds the values to codes, then refits the scale
   (and offset) to those codes by least squares; the fit of lowest error wins, and is refined by rounding
   again under it and refitting;
2. the sub-block scales (and mins) are put on the super-block's integer grid: ``d`` (``dmin``) makes the
   largest one the grid's end, each is rounded to its nearest step;
3. each integer scale (and min) moves by one step where that lowers the sub-block's error, its codes
   rounded again; the codes are then final.
"""
from __future__ import annotations

import itertools

import torch

QK_K = 256
# type -> (bytes per super-block, code bits); the layouts are written by the _pack_* functions
BLOCK_BYTES = {"Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}

# step 1's candidates: the sub-block's extreme maps to code (end + offset), for these offsets
_AFFINE_OFFSETS = torch.linspace(-1.0, 1.5, 11).tolist()
_SYMMETRIC_OFFSETS = torch.linspace(-0.6, 1.2, 10).tolist()
_REFITS = 2
# elements quantized at once (the candidate loop's temporaries are a few of these in fp32)
_CHUNK = {"cpu": 1 << 16, "cuda": 1 << 26}


def quantize_k(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """``weight`` [rows, cols] (cols a multiple of 256) as ``qtype`` blocks: uint8 [rows, cols/256 *
    block bytes] on the weight's device, row-major as GGUF stores it."""
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"k-quant types are {', '.join(BLOCK_BYTES)}, got {qtype!r}")
    rows, cols = weight.shape
    if cols % QK_K:
        raise ValueError(f"{qtype} needs rows of a multiple of {QK_K} values, got {cols}")
    flat = weight.detach().reshape(-1, QK_K)
    out = torch.empty(flat.shape[0], BLOCK_BYTES[qtype], dtype=torch.uint8, device=weight.device)
    step = max(1, _CHUNK.get(weight.device.type, _CHUNK["cpu"]) // QK_K)
    for start in range(0, flat.shape[0], step):
        blocks = flat[start:start + step].float()
        out[start:start + step] = _QUANTIZERS[qtype](blocks)
    return out.reshape(rows, -1)


# --- step 1: per sub-block fits ---------------------------------------------------------------------

def _affine_lsq(x, q, sum_x):
    """Least-squares (a, m) of x = a*q + m over the last axis, with the offset m <= 0 (the format stores
    -m as a non-negative min)."""
    n = x.shape[-1]
    sq, sqq, sqx = q.sum(-1, keepdim=True), (q * q).sum(-1, keepdim=True), (q * x).sum(-1, keepdim=True)
    det = n * sqq - sq * sq
    ok = det > 0
    a = torch.where(ok, (n * sqx - sq * sum_x) / torch.where(ok, det, 1), 0.0)
    m = (sum_x - a * sq) / n
    positive = m > 0
    a = torch.where(positive, sqx / sqq.clamp(min=1e-30), a)
    m = torch.where(positive, 0.0, m)
    return a.clamp(min=0), m


def _fit_affine(x: torch.Tensor, qmax: int):
    """Per row of x: (a >= 0, m <= 0) with x ~ a*q + m, q = round((x - m) / a) in [0, qmax]."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    span = x.amax(-1, keepdim=True) - lo
    sum_x = x.sum(-1, keepdim=True)
    best_err = torch.full_like(lo, float("inf"))
    best_a, best_m = torch.zeros_like(lo), lo.clone()
    for offset in _AFFINE_OFFSETS:
        inv = (qmax + offset) / span
        q = ((x - lo) * torch.nan_to_num(inv, posinf=0.0)).round_().clamp_(0, qmax)
        best_a, best_m, best_err = _keep_better_affine(x, q, sum_x, best_a, best_m, best_err)
    for _ in range(_REFITS):
        q = _affine_codes(x, best_a, best_m, qmax)
        best_a, best_m, best_err = _keep_better_affine(x, q, sum_x, best_a, best_m, best_err)
    return best_a.squeeze(-1), best_m.squeeze(-1)


def _keep_better_affine(x, q, sum_x, best_a, best_m, best_err):
    a, m = _affine_lsq(x, q, sum_x)
    err = (a * q + m - x).square_().sum(-1, keepdim=True)
    better = err < best_err
    return torch.where(better, a, best_a), torch.where(better, m, best_m), torch.where(better, err, best_err)


def _affine_codes(x, a, m, qmax):
    inv = torch.where(a > 0, 1 / torch.where(a > 0, a, 1), 0.0)
    return ((x - m) * inv).round_().clamp_(0, qmax)


def _fit_symmetric(x: torch.Tensor, qlo: int, qhi: int):
    """Per row of x: s with x ~ s*q, q = round(x / s) in [qlo, qhi] (qlo < 0 < qhi); the sign of s picks
    which end of the code range the row's largest magnitude goes to."""
    extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    safe = torch.where(extreme != 0, extreme, 1)
    best_score = torch.full_like(extreme, -1.0)
    best_s = torch.zeros_like(extreme)
    targets = [qlo - o for o in _SYMMETRIC_OFFSETS] + [qhi + o for o in _SYMMETRIC_OFFSETS]
    for target in targets:
        q = (x * (target / safe)).round_().clamp_(qlo, qhi)
        best_s, best_score = _keep_better_symmetric(x, q, best_s, best_score)
    for _ in range(_REFITS):
        q = _symmetric_codes(x, best_s, qlo, qhi)
        best_s, best_score = _keep_better_symmetric(x, q, best_s, best_score)
    return best_s.squeeze(-1)


def _keep_better_symmetric(x, q, best_s, best_score):
    """The least-squares s = <q,x>/<q,q> leaves error |x|^2 - <q,x>^2/<q,q>: the larger <q,x>^2/<q,q>,
    the better."""
    sqx, sqq = (q * x).sum(-1, keepdim=True), (q * q).sum(-1, keepdim=True)
    score = torch.where(sqq > 0, sqx * sqx / sqq.clamp(min=1e-30), 0.0)
    better = score > best_score
    s = torch.where(sqq > 0, sqx / sqq.clamp(min=1e-30), 0.0)
    return torch.where(better, s, best_s), torch.where(better, score, best_score)


def _symmetric_codes(x, s, qlo, qhi):
    inv = torch.where(s != 0, 1 / torch.where(s != 0, s, 1), 0.0)
    return (x * inv).round_().clamp_(qlo, qhi)


# --- steps 2 and 3: super-block grids ---------------------------------------------------------------

def _fp16(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-65504, 65504).half().float()


def _grid_affine(x: torch.Tensor, qmax: int):
    """x [B, J, n] -> (d, dmin [B] as stored in fp16, sc, m [B, J] in [0, 63], q [B, J, n])."""
    a, offset = _fit_affine(x, qmax)
    mins = -offset
    d = _fp16(a.amax(-1) / 63)
    dmin = _fp16(mins.amax(-1) / 63)
    sc = _grid_round(a, d, 0, 63)
    mn = _grid_round(mins, dmin, 0, 63)
    best_err = torch.full_like(a, float("inf"))
    best_sc, best_mn = sc, mn
    for dsc, dmn in itertools.product((0, -1, 1), repeat=2):
        sc_c, mn_c = (sc + dsc).clamp(0, 63), (mn + dmn).clamp(0, 63)
        err = _affine_error(x, d, dmin, sc_c, mn_c, qmax)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_sc, best_mn = torch.where(better, sc_c, best_sc), torch.where(better, mn_c, best_mn)
    scale, offset = (d[:, None] * best_sc)[..., None], -(dmin[:, None] * best_mn)[..., None]
    return d, dmin, best_sc, best_mn, _affine_codes(x, scale, offset, qmax)


def _affine_error(x, d, dmin, sc, mn, qmax):
    scale, offset = (d[:, None] * sc)[..., None], -(dmin[:, None] * mn)[..., None]
    q = _affine_codes(x, scale, offset, qmax)
    return (scale * q + offset - x).square_().sum(-1)


def _grid_symmetric(x: torch.Tensor, qlo: int, qhi: int, slo: int, shi: int):
    """x [B, J, n] -> (d [B] as stored in fp16, sc [B, J] in [slo, shi], q [B, J, n]); the largest
    sub-block scale in magnitude lands on the grid's negative end (slo < 0)."""
    s = _fit_symmetric(x, qlo, qhi)
    extreme = s.gather(-1, s.abs().argmax(-1, keepdim=True)).squeeze(-1)
    d = _fp16(extreme / slo)
    sc = _grid_round(s, d, slo, shi)
    best_err = torch.full_like(s, float("inf"))
    best_sc = sc
    for step in (0, -1, 1):
        sc_c = (sc + step).clamp(slo, shi)
        scale = (d[:, None] * sc_c)[..., None]
        err = (scale * _symmetric_codes(x, scale, qlo, qhi) - x).square_().sum(-1)
        better = err < best_err
        best_err, best_sc = torch.where(better, err, best_err), torch.where(better, sc_c, best_sc)
    scale = (d[:, None] * best_sc)[..., None]
    return d, best_sc, _symmetric_codes(x, scale, qlo, qhi)


def _grid_round(v, d, lo, hi):
    inv = torch.where(d != 0, 1 / torch.where(d != 0, d, 1), 0.0)
    return (v * inv[:, None]).round_().clamp_(lo, hi)


# --- the byte layouts -------------------------------------------------------------------------------

def _u8(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.int32).to(torch.uint8)


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    return d.half().view(torch.uint8).reshape(-1, 2)


def _scales_mins_6bit(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and 8 six-bit mins in 12 bytes: bytes 0-3 hold sc 0-3 (low 6 bits) and the top 2
    bits of sc 4-7; bytes 4-7 the same for the mins; bytes 8-11 the low nibbles of sc 4-7 (low) and of
    mins 4-7 (high)."""
    sc, mn = sc.to(torch.int32), mn.to(torch.int32)
    first = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    second = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return _u8(torch.cat([first, second, third], 1))


def _nibbles_q4k(q: torch.Tensor) -> torch.Tensor:
    """[B, 8, 32] 4-bit codes -> 128 bytes: byte 32c+i holds sub-block 2c's value i (low nibble) and
    sub-block 2c+1's (high)."""
    q = q.to(torch.int32).reshape(-1, 4, 2, 32)
    return _u8(q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """d fp16, dmin fp16, 12 bytes of scales/mins, 128 bytes of codes."""
    d, dmin, sc, mn, q = _grid_affine(blocks.reshape(-1, 8, 32), 15)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _scales_mins_6bit(sc, mn), _nibbles_q4k(q)], 1)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """d fp16, dmin fp16, 12 bytes of scales/mins, 32 bytes of fifth bits (bit j of byte i: sub-block j's
    value i), 128 bytes of low nibbles as Q4_K."""
    d, dmin, sc, mn, q = _grid_affine(blocks.reshape(-1, 8, 32), 31)
    q = q.to(torch.int32)
    shifts = torch.arange(8, device=q.device, dtype=torch.int32)[None, :, None]
    high = (((q >> 4) & 1) << shifts).sum(1)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _scales_mins_6bit(sc, mn), _u8(high),
                      _nibbles_q4k(q & 15)], 1)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales, d fp16. Stored codes are
    u = q + 32 in [0, 63]; value e = 128h + r: low nibble in byte 64h + r%64 (shift 4*(r//64)), high bits
    in byte 32h + r%32 (shift 2*(r//32))."""
    d, sc, q = _grid_symmetric(blocks.reshape(-1, 16, 16), -32, 31, -128, 127)
    u = (q.to(torch.int32) + 32).reshape(-1, 2, 4, 32)  # [B, half, r//32, r%32]
    low = (u & 15).reshape(-1, 2, 2, 64)
    ql = low[:, :, 0] | (low[:, :, 1] << 4)  # [B, half, 64]
    shifts = (2 * torch.arange(4, device=u.device, dtype=torch.int32))[None, None, :, None]
    qh = (((u >> 4) & 3) << shifts).sum(2)  # [B, half, 32]
    scales = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([_u8(ql).reshape(-1, 128), _u8(qh).reshape(-1, 64), scales, _fp16_bytes(d)], 1)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """32 bytes of high bits (bit s of byte b: value 32s + b), 64 bytes of low 2-bit pairs (value
    128h + 32s + b in byte 32h + b, shift 2s), 12 bytes of 6-bit scales (stored + 32: low nibbles of
    scales k and k + 8 in byte k < 8, top 2 bits of scale 4s + i in byte 8 + i, shift 2s), d fp16. Stored
    codes are u = q + 4 in [0, 7]."""
    d, sc, q = _grid_symmetric(blocks.reshape(-1, 16, 16), -4, 3, -32, 31)
    u = q.to(torch.int32).reshape(-1, 256) + 4
    shifts8 = torch.arange(8, device=u.device, dtype=torch.int32)[None, :, None]
    hmask = (((u >> 2) & 1).reshape(-1, 8, 32) << shifts8).sum(1)
    shifts4 = (2 * torch.arange(4, device=u.device, dtype=torch.int32))[None, None, :, None]
    qs = ((u & 3).reshape(-1, 2, 4, 32) << shifts4).sum(2).reshape(-1, 64)
    v = sc.to(torch.int32) + 32
    low = (v[:, :8] & 15) | ((v[:, 8:] & 15) << 4)
    high = (((v >> 4) & 3).reshape(-1, 4, 4) << shifts4[:, :, :, 0].reshape(1, 4, 1)).sum(1)
    return torch.cat([_u8(hmask), _u8(qs), _u8(low), _u8(high), _fp16_bytes(d)], 1)


_QUANTIZERS = {"Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
