"""The compiled CPU top-k kernel returns torch.topk's latents and values, and hands ties and NaNs to torch.

Tests of the kernel itself skip where it was not built or where SAEFEAT_NATIVE_TOPK=0 switches it off (CI runs
this file a second time that way); the rest check the top-k that runs in its place.
"""

import gzip
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saefeat.sae import topk as topk_module
from saefeat.sae.topk import kernel_applies, kernel_enabled, topk_relu


def _reference(pre, k):
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return F.relu(vals), idx


def _as_sets(vals, idx):
    """Per row: {latent id: value}, so that the order inside a row does not matter."""
    return [dict(zip(i.tolist(), v.float().tolist())) for v, i in zip(vals, idx)]


KERNEL_OFF = os.environ.get("SAEFEAT_NATIVE_TOPK") == "0"  # as this run was started, before any monkeypatch
needs_kernel = pytest.mark.skipif(
    topk_module._topk is None or KERNEL_OFF,
    reason="switched off by SAEFEAT_NATIVE_TOPK=0" if KERNEL_OFF
    else "the C extension saefeat.sae._topk was not built (no C compiler at install time)")


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
    """The kernel whatever torch's thread count (by default it stands aside above KERNEL_MAX_THREADS), unless
    this run switched it off."""
    if not KERNEL_OFF:
        monkeypatch.setenv("SAEFEAT_NATIVE_TOPK", "1")


def _assert_same_codes(pre, k):
    assert kernel_applies(pre, k)
    got, want = topk_relu(pre, k), _reference(pre, k)
    assert got[0].dtype == want[0].dtype and got[1].shape == want[1].shape == (pre.shape[0], k)
    assert _as_sets(*got) == _as_sets(*want)


def _assert_flags_only_ties(pre, k):
    """Most rows are the kernel's own work: it hands back exactly the rows whose top k is not unique (bf16 has 8
    significant bits, so the k-th and (k+1)-th values are often equal: 35% of these rows at the shipped SAE's
    k=48, fewer at smaller k)."""
    rows = pre.shape[0]
    idx, vals = torch.empty(rows, k, dtype=torch.long), torch.empty(rows, k, dtype=pre.dtype)
    flagged = torch.empty(rows, dtype=torch.bool)
    topk_module._topk.topk_relu(pre.data_ptr(), rows, pre.shape[1], pre.stride(0), k, pre.dtype == torch.bfloat16,
                                idx.data_ptr(), vals.data_ptr(), flagged.data_ptr())
    kth, after = pre.float().topk(k + 1, dim=-1).values[:, -2:].unbind(1)
    assert torch.equal(flagged, kth == after)
    assert 0.01 < flagged.float().mean() < 0.5


def _scifact(data_dir, n: int) -> list[str]:
    with gzip.open(data_dir / "retrieval" / "scifact" / "corpus.jsonl.gz", "rt") as fh:
        return [json.loads(line)["text"] for line, _ in zip(fh, range(n))]


@pytest.fixture(scope="module")
def real_pre_acts(data_dir):
    """bf16 pre-activations of the default minilm SAE on real SciFact abstracts, as the embedder computes them.

    bf16 is asked for: "auto" is fp32 on CPUs without native bf16, where ties at the k-th value are rare. 3
    abstracts (about 1,000 rows) keep it to seconds where bf16 is emulated (0.6-1 GFLOP/s).
    """
    from saefeat.embed.embedder import SAEEmbedder

    docs = _scifact(data_dir, 3)
    emb = SAEEmbedder("minilm", cache_dir=False, precision="bf16")
    with emb._cast_once(), torch.no_grad():
        xs = [x for _, _, x in emb.reader.batches(emb.reader.token_ids(docs), 32)]
        pre = emb.sae.pre_acts(torch.cat(xs))
    assert pre.dtype == torch.bfloat16 and pre.shape[1] == emb.sae.d_sae and len(pre) >= 1000
    return pre, emb.sae.k


@needs_kernel
def test_kernel_stands_aside_for_many_threads(monkeypatch):
    """By default the kernel runs while torch uses few threads; with more, torch.topk's parallel loop is as fast.
    (That `pip install` builds it where a C compiler exists is checked on the wheel in test_packaging.py.)"""
    assert topk_module._topk is not None and kernel_enabled()
    monkeypatch.delenv("SAEFEAT_NATIVE_TOPK")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(topk_module.KERNEL_MAX_THREADS + 1)
        assert not kernel_enabled()
        torch.set_num_threads(1)
        assert kernel_enabled()
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_real_codes_match_torch_topk(real_pre_acts, dtype):
    pre, k = real_pre_acts
    pre = pre.to(dtype)
    _assert_same_codes(pre, k)
    _assert_flags_only_ties(pre, k)


@needs_kernel
def test_portable_path_and_row_stride(real_pre_acts):
    """A width that is no multiple of 16 takes the portable C path; a column slice has a row stride != width."""
    pre, k = real_pre_acts
    sliced = pre[:300, : 16 * (k + 1) * 4 + 8]
    assert sliced.stride(0) != sliced.shape[1]
    _assert_same_codes(sliced, k)
    _assert_flags_only_ties(sliced, k)


def test_ties_nans_and_flat_rows_follow_torch():
    """Rows whose top k is not unique, rows with a NaN and rows of equal values get torch.topk's own answer."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 1024, generator=g)
    k = 8
    top = pre.topk(k + 1, dim=-1).values
    tie_rows = torch.arange(0, 64, 4)
    for r in tie_rows.tolist():  # the (k+1)-th largest value copied onto the k-th: two sets are possible
        kth = pre[r] == top[r, k - 1]
        pre[r, kth] = top[r, k]
    pre[1, 100] = float("nan")
    pre[2] = 0.5
    pre[3, :] = -1.0  # every top value negative: all ReLU'd to zero
    pre[3, 5] = 2.0
    got_vals, got_idx = topk_relu(pre, k)
    want_vals, want_idx = _reference(pre, k)
    for r in [*tie_rows.tolist(), 1, 2]:  # flagged rows are torch's answer, slot for slot
        assert torch.equal(got_idx[r], want_idx[r]) and torch.equal(got_vals[r].isnan(), want_vals[r].isnan())
    assert _as_sets(got_vals[4:], got_idx[4:]) == _as_sets(want_vals[4:], want_idx[4:])
    assert got_vals[3].count_nonzero() == 1 and 5 in got_idx[3].tolist()


def test_fallbacks_without_the_kernel(monkeypatch, real_pre_acts):
    """SAEFEAT_NATIVE_TOPK=0, a k too large for the grouping, or a transposed view run torch.topk: same result."""
    pre, k = real_pre_acts
    assert not kernel_applies(pre[:50, :512], 40)  # 16 (k + 1) > 512
    assert not kernel_applies(pre, topk_module.KERNEL_MAX_K + 1)
    assert _as_sets(*topk_relu(pre[:50, :512], 40)) == _as_sets(*_reference(pre[:50, :512], 40))
    square = pre[:256, :256].t()
    assert not kernel_applies(square, 8)
    assert _as_sets(*topk_relu(square, 8)) == _as_sets(*_reference(square, 8))
    monkeypatch.setenv("SAEFEAT_NATIVE_TOPK", "0")
    assert not kernel_enabled() and not kernel_applies(pre, k)
    assert _as_sets(*topk_relu(pre[:50], k)) == _as_sets(*_reference(pre[:50], k))


@needs_kernel
def test_embedding_is_identical_with_and_without_the_kernel(monkeypatch, data_dir):
    """The pooled statistics (sum, max, count) are bit-identical, so caches written by either path agree. In bf16,
    where the kernel hands tied rows back to torch.topk; 3 abstracts stay quick where bf16 is emulated."""
    from saefeat.embed.embedder import SAEEmbedder

    docs = _scifact(data_dir, 3)
    emb = SAEEmbedder("minilm", cache_dir=False, precision="bf16")
    calls, native = [], topk_module._topk.topk_relu
    monkeypatch.setattr(topk_module._topk, "topk_relu", lambda *a: calls.append(1) or native(*a))
    fast = emb.encode_stats(docs, "sae", show_progress_bar=False)
    assert calls
    monkeypatch.setenv("SAEFEAT_NATIVE_TOPK", "0")
    slow = emb.encode_stats(docs, "sae", show_progress_bar=False)
    for name in ("sum", "max", "count"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
        assert np.array_equal(a.data, b.data)
