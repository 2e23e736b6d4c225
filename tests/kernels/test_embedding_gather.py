"""embedding_gather against torch's embedding lookup: exact (it copies rows), every element written."""
import pytest
import torch

from fastbench.kernels import embedding_gather as op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids_shape, vocab, width", [((1,), 7, 37), ((3, 5), 50, 130), ((2, 9), 11, 2049)])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_matches_torch_embedding(seed, poison, dtype, ids_shape, vocab, width, id_dtype):
    table = torch.randn(vocab, width).to(dtype)
    ids = torch.randint(0, vocab, ids_shape).to(id_dtype)
    out = op.embedding_gather(ids, table)
    assert out.shape == (*ids_shape, width) and out.dtype == dtype
    assert torch.equal(out, op.reference(ids.long(), table))


def test_rows_of_a_wider_table(seed, poison):
    """A table whose rows are strided (a slice of a wider one), ids repeating and in any order."""
    wide = torch.randn(20, 300)
    table = wide[:, 17:217]
    ids = torch.tensor([[19, 0, 0, 7], [3, 19, 12, 1]])
    assert torch.equal(op.embedding_gather(ids, table), op.reference(ids, table))


@pytest.mark.parametrize("config", op.CANDIDATES["fwd"][::7])
def test_every_config_writes_every_element(seed, poison, config):
    table = torch.randn(31, 1500)
    ids = torch.randint(0, 31, (13,))
    assert torch.equal(op._gather(ids, table, ids.device, config), op.reference(ids, table))


@pytest.mark.parametrize("bad", [-1, 7])
def test_an_id_outside_the_table_is_refused(bad):
    with pytest.raises(RuntimeError, match=r"ids must lie in \[0, 7\)"):
        op.embedding_gather(torch.tensor([0, bad, 3]), torch.randn(7, 5))


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="2-D table"):
        op.embedding_gather(torch.tensor([0]), torch.randn(4))
    with pytest.raises(TypeError, match="integer ids"):
        op.embedding_gather(torch.tensor([0.0]), torch.randn(4, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_pinned_host_table_on_gpu(seed, dtype):
    """The GPU reads a table in pinned host memory directly; the rows equal the lookup on the device."""
    table = torch.randn(128256, 4096, dtype=dtype, pin_memory=True)
    ids = torch.randint(0, table.shape[0], (2, 2048), device="cuda")
    out = op.embedding_gather(ids, table)
    assert out.is_cuda and torch.equal(out, op.reference(ids, table.cuda()))
    with pytest.raises(ValueError, match="pinned host memory"):
        op.embedding_gather(ids, torch.randn(8, 4))
