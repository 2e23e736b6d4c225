"""NF4 dequantize: bit-exact against bitsandbytes (CPU) and against the PyTorch reference."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

from fastbench.kernels import nf4  # noqa: E402

# bitsandbytes 0.50.2's CPU dequantize is only right for widths that are a multiple of the blocksize
# or odd (its generic path); 3 x 80 is checked against the reference instead (the flat layout of bnb's
# generic and CUDA paths, and of its quantizer).
BNB_SHAPES = [(64, 64), (128, 320), (17, 64), (1, 64), (5, 33), (7, 1)]


def _quantize(shape, dtype, nested=True, quant_type="nf4"):
    weight = torch.randn(shape, dtype=dtype) * torch.rand(()).add(0.5)
    return bnbf.quantize_4bit(weight, quant_type=quant_type, compress_statistics=nested)


@pytest.mark.parametrize("shape", BNB_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bit_exact_with_bitsandbytes(seed, shape, dtype):
    packed, state = _quantize(shape, dtype)
    out = torch.full(shape, float("nan"), dtype=dtype)
    got = nf4.dequantize_nf4_weight(packed, out, quant_state=state)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_absmax_forms_and_fp4_table(seed, nested, quant_type):
    packed, state = _quantize((33, 128), torch.bfloat16, nested, quant_type)
    assert torch.equal(nf4.dequantize_nf4_weight(packed, quant_state=state), bnbf.dequantize_4bit(packed, state))


def test_params4bit_and_quant_storage(seed):
    for storage in (torch.uint8, torch.bfloat16, torch.float32):
        param = bnb.nn.Params4bit(torch.randn(24, 128, dtype=torch.bfloat16), requires_grad=False,
                                  quant_type="nf4", compress_statistics=True, quant_storage=storage)
        param = param._quantize("cpu")
        assert param.data.dtype == storage
        assert torch.equal(nf4.dequantize_nf4_weight(param), bnbf.dequantize_4bit(param.data, param.quant_state))


def test_low_level_call_with_fp32_absmax(seed):
    packed, state = _quantize((10, 128), torch.float16, nested=False)
    out = nf4.dequantize_nf4(packed, state.absmax, shape=(10, 128), dtype=torch.float16)  # default NF4 table
    assert torch.equal(out, bnbf.dequantize_4bit(packed, state))


def test_rows_not_multiple_of_block_match_reference(seed):
    packed, state = _quantize((3, 80), torch.bfloat16)
    s2 = state.state2
    expected = nf4.reference(packed, state.absmax, state.code, shape=(3, 80), absmax_code=s2.code,
                             absmax_scale=s2.absmax, absmax_offset=state.offset, dtype=torch.bfloat16)
    assert torch.equal(nf4.dequantize_nf4_weight(packed, quant_state=state), expected)


def test_one_buffer_serves_every_layer(seed):
    """A buffer sized for the largest layer is reused; each call writes only its own prefix."""
    layers = [_quantize(shape, torch.bfloat16) for shape in [(128, 320), (17, 64), (64, 64)]]
    buffer = torch.full((128 * 320,), float("nan"), dtype=torch.bfloat16)
    for packed, state in layers:
        got = nf4.dequantize_nf4_weight(packed, buffer, quant_state=state)
        assert got.shape == state.shape and got.data_ptr() == buffer.data_ptr()
        assert torch.equal(got, bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_shaped_output_view_reused_across_weights(seed, dtype):
    """The fused path passes the same [o, i] workspace view for every weight of that shape, step after
    step (its 32-bit store view is made once); each call must write that weight's values."""
    layers = [_quantize((64, 128), dtype) for _ in range(3)]
    view = torch.full((64 * 128 + 32,), float("nan"), dtype=dtype)[: 64 * 128].view(64, 128)
    for _ in range(2):
        for packed, state in layers:
            got = nf4.dequantize_nf4_weight(packed, view, quant_state=state)
            assert got is view and torch.equal(got, bnbf.dequantize_4bit(packed, state))
    odd = torch.empty(4, 3, dtype=dtype)  # an odd last dimension: the store view is taken flat
    packed, state = bnbf.quantize_4bit(torch.randn(4, 3, dtype=dtype), quant_type="nf4")
    assert torch.equal(nf4.dequantize_nf4_weight(packed, odd, quant_state=state), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shapes", [[(64, 128), (16, 128), (16, 128)], [(128, 64), (64, 64)], [(3, 33), (5, 33)]])
def test_stacked_weights_in_one_launch(seed, dtype, shapes):
    """Q/K/V (or gate/up) dequantized together, each bit-exact, at its offset in the one output; the
    same output view again next step; weights that cannot share a launch still come out right."""
    layers = [_quantize(shape, dtype) for shape in shapes]
    total = sum(a * b for a, b in shapes)
    out = torch.full((total + 40,), float("nan"), dtype=dtype)[:total]
    if all(s[1] == shapes[0][1] for s in shapes):
        out = out.view(-1, shapes[0][1])
    for _ in range(2):
        views = nf4.dequantize_nf4_weights([p for p, _ in layers], out, quant_states=[s for _, s in layers])
        start = 0
        for view, (packed, state) in zip(views, layers):
            expected = (nf4.reference(packed, state.absmax, state.code, shape=state.shape,
                                      blocksize=state.blocksize, absmax_code=state.state2.code,
                                      absmax_scale=state.state2.absmax, absmax_offset=state.offset, dtype=dtype)
                        if state.shape[1] % 64 and state.shape[1] % 2 == 0 else bnbf.dequantize_4bit(packed, state))
            assert view.shape == state.shape and torch.equal(view, expected)
            assert view.data_ptr() == out.data_ptr() + start * out.element_size()
            start += view.numel()
    mixed = [layers[0], _quantize(shapes[1], dtype, nested=False)]  # no shared nesting: one launch each
    views = nf4.dequantize_nf4_weights([p for p, _ in mixed], quant_states=[s for _, s in mixed])
    assert all(torch.equal(v, bnbf.dequantize_4bit(p, s)) for v, (p, s) in zip(views, mixed))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_word_and_halfword_stores_agree(seed, dtype):
    """16-bit outputs are stored as 32-bit words (two values each) where the buffer is 4-byte aligned
    and the count even; a buffer starting at an odd element takes the one-value path: same bits, and
    nothing outside the output is written."""
    packed, state = _quantize((17, 64), dtype)
    buffer = torch.full((17 * 64 + 1,), float("nan"), dtype=dtype)
    shifted = nf4.dequantize_nf4_weight(packed, buffer[1:], quant_state=state)
    assert shifted.data_ptr() % 4 != 0 and torch.isnan(buffer[0])
    aligned = nf4.dequantize_nf4_weight(packed, quant_state=state)
    assert aligned.data_ptr() % 4 == 0
    assert torch.equal(shifted, aligned) and torch.equal(aligned, bnbf.dequantize_4bit(packed, state))


def test_cached_launch_plan_follows_new_data(seed):
    """The checked launch arguments kept on a quant state are rebuilt when its tensors are replaced."""
    packed_a, state = _quantize((17, 64), torch.bfloat16)
    packed_b, state_b = _quantize((17, 64), torch.bfloat16)
    assert torch.equal(nf4.dequantize_nf4_weight(packed_a, quant_state=state), bnbf.dequantize_4bit(packed_a, state))
    state.absmax, state.offset, state.state2 = state_b.absmax, state_b.offset, state_b.state2
    assert torch.equal(nf4.dequantize_nf4_weight(packed_b, quant_state=state), bnbf.dequantize_4bit(packed_b, state_b))


def test_a_kept_launch_is_reused_into_the_same_output_and_follows_new_data(seed):
    """A group's launch into the same output object is kept on its first quant state and launched again as it is;
    new packed data (a moved weight) or another output makes a new one, and the values follow."""
    layers = [_quantize(shape, torch.bfloat16) for shape in ((64, 128), (16, 128), (16, 128))]
    out = torch.empty(96, 128, dtype=torch.bfloat16)

    def run(weights):
        return nf4.dequantize_nf4_weights(weights, out, quant_states=[s for _, s in layers])

    run([p for p, _ in layers])
    kept = getattr(layers[0][1], nf4._LAUNCH_ATTR)
    views = run([p for p, _ in layers])
    assert getattr(layers[0][1], nf4._LAUNCH_ATTR) is kept
    assert all(torch.equal(v, bnbf.dequantize_4bit(p, s)) for v, (p, s) in zip(views, layers))
    moved = [layers[0][0].clone()] + [p for p, _ in layers[1:]]  # the same codes at a new address
    moved[0].copy_(_quantize((64, 128), torch.bfloat16)[0])  # ... then other codes there
    views = run(moved)
    assert getattr(layers[0][1], nf4._LAUNCH_ATTR) is not kept
    assert torch.equal(views[0], bnbf.dequantize_4bit(moved[0], layers[0][1]))


def test_bad_out_buffer_is_rejected(seed):
    packed, state = _quantize((17, 64), torch.bfloat16)
    with pytest.raises(ValueError):
        nf4.dequantize_nf4_weight(packed, torch.empty(17 * 64 - 1, dtype=torch.bfloat16), quant_state=state)
    with pytest.raises(ValueError):
        nf4.dequantize_nf4_weight(packed, torch.empty(17 * 64, dtype=torch.float16), quant_state=state)


@pytest.mark.parametrize("shape", [(9, 192), (64, 176)])
def test_every_candidate_is_exact(seed, shape):
    case = nf4.tune_case("fwd", nf4.problem_key(shape, torch.bfloat16, 64, True), "cpu")
    for config in nf4.SPEC.candidates["fwd"][::4]:
        assert torch.equal(case.run(config), case.expected), config


def test_problems_cover_the_projections():
    from fastbench.presets import build_config

    probs = nf4.problems(build_config("llama-3-8b"), 4096, torch.bfloat16)
    shapes = {(p["rows"], p["cols"]) for _, p in probs}
    # q, k/v, o, gate/up, down, and the stacked groups Q/K/V and gate/up
    assert shapes == {(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (6144, 4096), (28672, 4096)}
    assert all(p == "fwd" and nf4.heuristic(p, prob) in nf4.SPEC.candidates["fwd"] for p, prob in probs)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (3584, 18944)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bit_exact_with_bitsandbytes_gpu(seed, shape, dtype):
    weight = torch.randn(shape, dtype=dtype, device="cuda")
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    out = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    assert torch.equal(nf4.dequantize_nf4_weight(packed, out, quant_state=state), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape", [(48, 32), (96, 16), (2048, 32)])
def test_rows_shorter_than_a_block_match_a_decode_by_hand(seed, shape):
    """Rows shorter than the 64-element block: the blocks run across rows of the flat array. Here this
    CPU's bitsandbytes dequantize_4bit (0.50.2) disagrees with its own quantize_4bit (about twice NF4's
    error against the weight), so the oracle is a decode by hand of its packed codes: two codes per byte,
    high nibble first, the NF4 table, one absmax per 64 elements of the flat array (double quantized)."""
    weight = torch.randn(shape)
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], -1).view(-1).long()
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    by_hand = (state.code[codes] * absmax.repeat_interleave(64)[: codes.numel()]).view(shape)
    assert torch.equal(nf4.dequantize_nf4_weight(packed, quant_state=state), by_hand)
