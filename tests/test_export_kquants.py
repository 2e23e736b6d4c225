"""fastbench's own k-quant (and IQ4_NL) quantizers: the bytes are the GGUF layout (the gguf package's
dequantizer reads back what the quantizer chose), exactly representable blocks come back exactly, and the
error is what each format allows; plus the per-tensor types of each scheme."""
import pytest
import torch

from fastbench.export import kquants
from fastbench.export.kquants import quantize_k
from fastbench.export.quants import IQ4_NL_LEVELS, quantize_iq4_nl
from fastbench.export.schemes import ModelFacts, get_scheme, more_bits, tensor_type

gguf = pytest.importorskip("gguf")
K_TYPES = ["Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def dequantize(data: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[kind]).copy())


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", K_TYPES)
def test_bytes_decode_to_the_values_the_quantizer_chose(seed, kind):
    """The gguf package's dequantizer, given our bytes, gives d*sc*q (- dmin*m) of the quantizer's own
    choices, bit for bit: every field is where the format puts it."""
    x = torch.randn(5, 256 * 3) * torch.rand(5, 1) * 3
    x[0, :40] = 0  # a zero sub-block, and
    x[1, 256:512] = x[1, 256:512].abs() + 0.5  # a block with no negative values (no min)
    blocks = x.reshape(-1, 256)
    if kind in ("Q4_K", "Q5_K"):
        d, dmin, sc, mn, q = kquants._grid_affine(blocks.reshape(-1, 8, 32), 15 if kind == "Q4_K" else 31)
        chosen = (d[:, None] * sc)[..., None] * q - (dmin[:, None] * mn)[..., None]
        assert sc.max() <= 63 and mn.max() <= 63 and sc.min() >= 0 and mn.min() >= 0
    else:
        qlo, qhi, slo, shi = (-4, 3, -32, 31) if kind == "Q3_K" else (-32, 31, -128, 127)
        d, sc, q = kquants._grid_symmetric(blocks.reshape(-1, 16, 16), qlo, qhi, slo, shi)
        chosen = (d[:, None] * sc)[..., None] * q
        assert q.min() >= qlo and q.max() <= qhi and sc.min() >= slo and sc.max() <= shi
    data = quantize_k(x, kind)
    assert data.dtype == torch.uint8 and data.shape == (5, 3 * kquants.BLOCK_BYTES[kind])
    assert torch.equal(dequantize(data, kind), chosen.reshape(5, -1))


@pytest.mark.parametrize("kind", K_TYPES)
def test_representable_blocks_come_back_exactly(kind):
    """Fixed vectors built from the format's own fields (power-of-two d, integer scales using the whole
    grid, codes reaching both ends): quantized and read back unchanged."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for block in range(4):
        if kind in ("Q4_K", "Q5_K"):
            qmax = 15 if kind == "Q4_K" else 31
            q = torch.randint(0, qmax + 1, (8, 32), generator=g).float()
            q[:, 0], q[:, 1] = 0, qmax
            sc = torch.randint(1, 64, (8,), generator=g).float()
            mn = torch.randint(0, 64, (8,), generator=g).float()
            sc[block % 8], mn[(block + 3) % 8] = 63, 63
            rows.append((2.0 ** -(block + 6)) * sc[:, None] * q - (2.0 ** -(block + 5)) * mn[:, None])
        else:
            qlo, qhi, smax = (-4, 3, 32) if kind == "Q3_K" else (-32, 31, 128)
            q = torch.randint(qlo, qhi + 1, (16, 16), generator=g).float()
            q[:, 0] = qlo
            sc = torch.randint(1, smax, (16,), generator=g).float()
            sc[block] = smax  # the largest scale is the grid's end (stored as -smax with a negative d)
            rows.append((2.0 ** -(block + 8)) * sc[:, None] * q)
    x = torch.stack(rows).reshape(2, -1)
    assert torch.equal(dequantize(quantize_k(x, kind), kind), x)


@pytest.mark.parametrize("kind,bound", [("Q3_K", 0.2), ("Q4_K", 0.1), ("Q5_K", 0.05), ("Q6_K", 0.025)])
def test_error_is_what_the_format_allows(seed, kind, bound):
    x = torch.randn(16, 1024) * 0.02
    x[3, 17] = 0.5  # an outlier costs its own block only
    back = dequantize(quantize_k(x, kind), kind)
    assert back.isfinite().all() and rel(back, x) < bound
    others = torch.ones_like(x, dtype=torch.bool)
    others[3, :256] = False
    assert rel(back[others], x[others]) < bound


def test_zeros_stay_exact_and_constants_keep_fp16_precision():
    x = torch.zeros(2, 512)
    x[1, 256:] = -1.5
    for kind in K_TYPES:
        back = dequantize(quantize_k(x, kind), kind)
        assert torch.equal(back[:, :256], x[:, :256]) and rel(back, x) < 1e-3, kind


def test_rows_of_other_widths_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(torch.randn(2, 320), "Q4_K")


def test_iq4_nl_layout_and_error(seed):
    levels = torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32)
    idx = torch.randint(0, 16, (4, 64))
    idx[:, 0] = 0  # the table's largest magnitude in each block of 32
    idx[:, 32] = 0
    exact = levels[idx] * 2.0 ** -10
    data = quantize_iq4_nl(exact)
    assert data.shape == (4, 36) and torch.equal(dequantize(data, "IQ4_NL"), exact)
    x = torch.randn(8, 96)
    assert rel(dequantize(quantize_iq4_nl(x), "IQ4_NL"), x) < 0.12


# --- schemes -----------------------------------------------------------------------------------------

LLAMA3_8B = ModelFacts(n_layer=32, has_output=True)
SHAPES = {"token_embd.weight": (128256, 4096), "output.weight": (128256, 4096), "output_norm.weight": (4096,),
          "attn_q.weight": (4096, 4096), "attn_v.weight": (1024, 4096), "attn_output.weight": (4096, 4096),
          "ffn_gate.weight": (14336, 4096), "ffn_down.weight": (4096, 14336), "attn_norm.weight": (4096,)}


def types(method, layer, facts=LLAMA3_8B, shapes=SHAPES):
    scheme = get_scheme(method)
    out = {}
    for name, shape in shapes.items():
        full = name if name.startswith(("token", "output")) else f"blk.{layer}.{name}"
        out[name] = tensor_type(scheme, full, shape, facts)
    return out


def test_more_bits_layers_of_a_32_layer_model():
    assert [i for i in range(32) if more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


@pytest.mark.parametrize("method,layer,expected", [
    ("q4_k_m", 0, dict(attn_v="Q6_K", ffn_down="Q6_K", attn_q="Q4_K", attn_output="Q4_K", ffn_gate="Q4_K")),
    ("q4_k_m", 4, dict(attn_v="Q4_K", ffn_down="Q4_K")),
    ("q4_k_m", 6, dict(attn_v="Q6_K", ffn_down="Q6_K")),
    ("q5_k_m", 9, dict(attn_v="Q6_K", ffn_down="Q6_K", attn_q="Q5_K")),
    ("q5_k_m", 10, dict(attn_v="Q5_K", ffn_down="Q5_K")),
    ("q4_k_s", 3, dict(attn_v="Q5_K", ffn_down="Q5_K", attn_q="Q4_K")),
    ("q4_k_s", 4, dict(attn_v="Q4_K", ffn_down="Q4_K")),
    ("q5_k_s", 0, dict(attn_v="Q5_K", ffn_down="Q5_K")),
    ("q3_k_m", 1, dict(attn_v="Q5_K", ffn_down="Q5_K", attn_output="Q4_K", attn_q="Q3_K")),
    ("q3_k_m", 2, dict(attn_v="Q4_K", ffn_down="Q4_K", attn_output="Q4_K", ffn_gate="Q3_K")),
    ("q6_k", 0, dict(attn_v="Q6_K", ffn_down="Q6_K", attn_q="Q6_K")),
    ("q4_0", 0, dict(attn_v="Q4_0", ffn_down="Q4_0")),
    ("q8_0", 0, dict(attn_v="Q8_0", ffn_down="Q8_0")),
])
def test_scheme_layer_types(method, layer, expected):
    got = types(method, layer)
    assert {k: got[k + ".weight"] for k in expected} == expected
    assert got["attn_norm.weight"] == got["output_norm.weight"] == "F32"


@pytest.mark.parametrize("method,embd,out", [("q4_k_m", "Q4_K", "Q6_K"), ("q3_k_m", "Q3_K", "Q6_K"),
                                             ("q6_k", "Q6_K", "Q6_K"), ("q4_0", "Q4_0", "Q6_K"),
                                             ("q5_0", "Q5_0", "Q6_K"), ("q8_0", "Q8_0", "Q8_0"),
                                             ("f16", "F16", "F16"), ("bf16", "BF16", "BF16")])
def test_output_and_embedding_types(method, embd, out):
    got = types(method, 0)
    assert (got["token_embd.weight"], got["output.weight"]) == (embd, out)
    tied = types(method, 0, ModelFacts(n_layer=32, has_output=False))  # token_embd is the output
    assert tied["token_embd.weight"] == out


def test_70b_class_gives_attn_v_five_bits():
    facts = ModelFacts(n_layer=80, has_output=True, is_70b=True)
    assert types("q4_k_s", 40, facts)["attn_v.weight"] == "Q5_K"
    assert types("q4_k_m", 40, facts)["attn_v.weight"] == "Q5_K"  # layer 40 is not a "more bits" layer


@pytest.mark.parametrize("method,cols,expected", [
    ("q4_k_m", 64, "Q5_0"), ("q5_k_s", 64, "Q5_1"), ("q6_k", 64, "Q8_0"), ("q3_k_m", 64, "IQ4_NL"),
    ("q4_k_m", 48, "F16"), ("q4_0", 48, "F16"), ("q4_0", 64, "Q4_0")])
def test_rows_that_do_not_split_into_blocks_fall_back(method, cols, expected):
    facts = ModelFacts(n_layer=8, has_output=True)
    assert tensor_type(get_scheme(method), "blk.4.attn_q.weight", (64, cols), facts) == expected
    out = tensor_type(get_scheme(method), "output.weight", (512, cols), facts)
    assert out == ("Q8_0" if cols % 32 == 0 else "F16")


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown quantization_method 'q4_k_xl'; valid: q4_k_m, q4_k_s, q5_k_m, "
                                         "q5_k_s, q6_k, q3_k_m, q8_0, q4_0, q5_0, f16, bf16, f32"):
        get_scheme("q4_k_xl")


def test_float_schemes_keep_one_dimensional_tensors_f32():
    assert tensor_type(get_scheme("f16"), "blk.0.attn_q.bias", (64,), LLAMA3_8B) == "F32"
    assert tensor_type(get_scheme("q4_k_m"), "rope_freqs.weight", (64,), LLAMA3_8B) == "F32"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", K_TYPES)
def test_gpu_quantizer_writes_the_same_format(seed, kind):
    """On CUDA the same search runs on the GPU: the bytes decode to the CPU result's error (sums may round
    differently, so a rare block may choose differently) and the layout test holds there too. Counted by
    super-block of 256 values, not by row: a Q6_K row of 4096 values makes 256 choices of a sub-block scale,
    and on the H200 8-20% of rows held one that differed, 0.5-1.3% of super-blocks."""
    x = torch.randn(64, 4096) * 0.02
    cpu = dequantize(quantize_k(x, kind), kind)
    gpu_bytes = quantize_k(x.cuda(), kind)
    assert gpu_bytes.is_cuda
    gpu = dequantize(gpu_bytes.cpu(), kind)
    assert rel(gpu, x) <= 1.001 * rel(cpu, x)
    assert (gpu != cpu).reshape(-1, 256).any(-1).float().mean() < 0.05
