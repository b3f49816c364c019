import pytest
import torch


def _hidden_states(host, ids, att):
    with torch.no_grad():
        out = host.model(input_ids=ids, attention_mask=att, output_hidden_states=True)
    return out.hidden_states


@pytest.mark.parametrize("name,layer", [("minilm", 3), ("minilm", 0), ("smollm2", 9)])
def test_hook_equals_output_hidden_states(name, layer, request):
    host = request.getfixturevalue(name)
    seqs = [host.wrap(ids)[0] for ids in host.tokenize(["Revenue grew 12% this quarter.", "Hello there, world"])]
    ids, att = host.pad_batch(seqs)
    acts = host.residual(ids, att, layer, precision="fp32")
    ref = _hidden_states(host, ids, att)[layer + 1]
    mask = att.bool()
    assert torch.allclose(acts[mask], ref[mask].float(), atol=1e-4, rtol=1e-4)


def test_forward_stops_after_hooked_block(minilm):
    calls = []
    handle = minilm.blocks[4].register_forward_hook(lambda *a: calls.append(1))
    try:
        ids, att = minilm.pad_batch([minilm.wrap(minilm.tokenize(["stop here"])[0])[0]])
        minilm.residual(ids, att, 3)
    finally:
        handle.remove()
    assert calls == []


def test_special_tokens_are_marked(minilm, smollm2):
    ids = minilm.tokenize(["a b c"])[0]
    full, content = minilm.wrap(ids)
    assert full[0] == minilm.tokenizer.cls_token_id and full[-1] == minilm.tokenizer.sep_token_id
    assert content == [False] + [True] * len(ids) + [False]
    full, content = smollm2.wrap(ids := smollm2.tokenize(["a b c"])[0])
    assert content[0] is False and all(content[1:]) and full[1:] == ids


def test_bad_layer_is_refused(minilm):
    with pytest.raises(ValueError, match="out of range"):
        minilm.check_layer(6)


def test_default_window_is_the_trained_length(minilm, smollm2):
    # all-MiniLM-L6-v2 holds 512 positions but was trained and is served at 256 tokens ([CLS] + 254 + [SEP])
    assert minilm.window_capacity == 510 and minilm.trained_length == 256
    assert minilm.default_window == 254
    ids = minilm.tokenize(["word " * 600])[0]
    wrapped, _ = minilm.wrap(ids[:minilm.default_window])
    assert len(wrapped) == 256
    assert smollm2.trained_length is None and smollm2.default_window == smollm2.window_capacity


def test_nested_hooks_capture_two_points_in_one_forward(minilm):
    batch = minilm.batch(minilm.tokenize(["The quarter closed with record revenue."]))
    with minilm.hook(2) as early, minilm.hook(4, stop=True) as late:
        minilm.forward(batch, "fp32")
    assert early.value is not None and late.value is not None and not torch.equal(early.value, late.value)
    ref = minilm.residual(batch.input_ids, batch.attention_mask, 2, "fp32")
    torch.testing.assert_close(early.value.float(), ref, rtol=0, atol=0)
    assert minilm._captures == []  # both hooks are gone
    with minilm.hook(3, "input", stop=True) as pre:  # block 3's input is block 2's output
        minilm.forward(batch, "fp32")
    torch.testing.assert_close(pre.value.float(), ref, rtol=0, atol=0)


def test_the_host_fingerprint_covers_every_byte_of_the_weights(tmp_path):
    """A change in the middle of a weights file (not only its first or last MiB) gives another fingerprint."""
    import os

    from saefeat.hosts import _fingerprint

    folder = tmp_path / "model"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(os.urandom(5 << 20))
    before = _fingerprint(str(folder), None)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert _fingerprint(str(folder), None) != before
    assert _fingerprint("org/not-cached-model", None) == "org/not-cached-model"  # offline: the name only
