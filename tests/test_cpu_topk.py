import numpy as np
import pytest
import torch

from saefeat.sae import cpu_topk


def _reference(pre: torch.Tensor, k: int) -> np.ndarray:
    """Dense (rows, d) result of a top-k then ReLU, ties at the k-th value broken by the lowest column."""
    a = pre.float().numpy()
    order = np.lexsort((np.arange(a.shape[1])[None, :].repeat(len(a), 0), -a), axis=1)[:, :k]  # value desc, id asc
    out = np.zeros_like(a)
    np.put_along_axis(out, order, np.maximum(np.take_along_axis(a, order, 1), 0), 1)
    return out


def _dense(rows, cols, vals, shape) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    out[rows.numpy(), cols.numpy()] = vals.float().numpy()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_with_ties_and_few_positives(dtype):
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(300, 700, generator=g)
    pre[::7] = torch.round(pre[::7] * 2) / 2  # many exact ties at the k-th value
    pre[5] = -1.0
    pre[5, [10, 400, 699]] = torch.tensor([0.5, 2.0, 0.25])  # three positives only
    pre[6] = 0.0  # no positive at all
    pre = pre.to(dtype)
    rows, cols, vals = cpu_topk.topk_positive(pre, 16)
    got = _dense(rows, cols, vals, pre.shape)
    np.testing.assert_array_equal(got, _reference(pre, 16))
    assert (rows == 5).sum() == 3 and (rows == 6).sum() == 0
    assert bool((vals > 0).all())


def test_sae_encode_sparse_uses_it_and_agrees_with_torch_topk(minilm):
    """On real minilm activations under bf16 autocast: the same codes as torch.topk, up to ties."""
    from saefeat.sae.formats import resolve_sae

    sae = resolve_sae("default", "minilm", minilm.device)
    ids = minilm.tokenize(["Revenue grew 12% as margins widened in the cloud segment, the CFO said."] * 4)
    ids, att = minilm.pad_batch([minilm.wrap(x)[0] for x in ids])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        x = minilm.residual(ids, att, 3).reshape(-1, minilm.d_model)
        rows, cols, vals = sae.encode_sparse(x)
        pre = sae.pre_acts(x)
    assert pre.dtype == torch.bfloat16 and cpu_topk.supports(pre)
    np.testing.assert_array_equal(_dense(rows, cols, vals, pre.shape), _reference(pre, sae.k))


def test_autograd_inputs_are_left_to_torch():
    pre = torch.randn(4, 64, requires_grad=True)
    assert not cpu_topk.supports(pre)
    with pytest.raises(ValueError, match="2-D CPU tensor"):
        cpu_topk.topk_positive(pre, 4)
    with torch.no_grad():
        assert cpu_topk.supports(pre)
