"""Latent cards, labels, terminal views and the MLflow latent report, on minilm and real data."""

from __future__ import annotations

import gzip
import html.parser
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saefeat.cli import app
from saefeat.embed.embedder import SAEEmbedder
from saefeat.explain.build import build_cards
from saefeat.explain.corpus import default_corpus
from saefeat.explain.llm import OpenAICompatible, detection_prompt, label_store
from saefeat.explain.report import log_latent_report
from saefeat.explain.store import LatentStore
from saefeat.hosts import get_host
from saefeat.sae import SAE, SAEConfig, save_sae
from tests.helpers import random_sae

WORD = "river"


@pytest.fixture(scope="module")
def corpus(data_dir):
    """Default-corpus passages plus real Gutenberg sentences that contain WORD (half to fit, half held out)."""
    texts, sources = default_corpus(data_dir, n_docs=16, passage_chars=500)
    sents = []
    with gzip.open(data_dir / "corpus" / "gutenberg_one_book_per_author.jsonl.gz", "rt") as fh:
        for line in fh:
            for m in re.finditer(rf"[^.\n]{{20,200}}\b{WORD}\b[^.\n]{{0,120}}\.", json.loads(line)["text"]):
                sents.append(" ".join(m.group(0).split()))
            if len(sents) >= 40:
                break
    return texts, sources, sents[:20], sents[20:40]


@pytest.fixture(scope="module")
def word_sae(corpus, tmp_path_factory) -> Path:
    """A ReLU SAE whose latent 0 reads the direction of WORD's layer-3 activations (fires on WORD only);
    the other latents are random."""
    texts, _, fit, _ = corpus
    host = get_host("minilm", "cpu")
    target = host.tokenizer.convert_tokens_to_ids(WORD)
    xs, hit = [], []
    for t in texts[:8] + fit:
        ids = host.tokenize([t])[0][:250]
        wrapped, content = host.wrap(ids)
        i, a = host.pad_batch([wrapped])
        xs.append(host.residual(i, a, 3)[0][torch.tensor(content)])
        hit += [x == target for x in ids]
    x, hit = torch.cat(xs), torch.tensor(hit)
    u = x[hit].mean(0) - x[~hit].mean(0)
    u = u / u.norm()
    proj = x @ u
    assert proj[hit].min() > proj[~hit].max()  # WORD is separable at this layer, or the test means nothing
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=384, d_sae=32, architecture="relu", host="minilm", layer=3))
    with torch.no_grad():
        sae.W_enc.normal_(0, 384 ** -0.5)
        sae.W_enc[:, 0] = u
        sae.b_enc[0] = -(proj[hit].min() + proj[~hit].max()) / 2
        sae.W_dec.normal_(0, 32 ** -0.5)
    return save_sae(sae, tmp_path_factory.mktemp("word_sae"))


@pytest.fixture(scope="module")
def word_store(corpus, word_sae, tmp_path_factory) -> Path:
    """Cards of `word_sae` over the passages and the held-out WORD sentences; returns the store folder."""
    texts, sources, _, held_out = corpus
    folder = tmp_path_factory.mktemp("latents")
    _build(word_sae, texts + held_out, sources + ["held"] * len(held_out), store_dir=folder)
    return folder


def _build(sae_path, texts, sources, precision="auto", **kw) -> tuple[SAEEmbedder, LatentStore]:
    emb = SAEEmbedder("minilm", str(sae_path), device="cpu", cache_dir=False, precision=precision)
    store = build_cards(emb, texts, sources, corpus="test", chunk_docs=kw.pop("chunk_docs", 8),
                        show_progress_bar=False, **kw)
    return emb, store


def test_listed_contexts_really_fire(corpus, tmp_path):
    texts, sources = corpus[0][:10], corpus[1][:10]
    # fp32: bf16 (the CPU default where it is native) rounds differently with other batch padding
    emb, store = _build(random_sae(tmp_path / "sae", d_sae=256, k=8), texts, sources, precision="fp32")
    docs = store.docs()
    assert store.complete and len(docs) == len(texts) and store.n_tokens > 1000
    latents = [0, 17, 101, 255]
    recomputed = {}
    for card in store.cards(latents):
        assert card.top and card.weak and card.label
        assert [c.act for c in card.top] == sorted((c.act for c in card.top), reverse=True)
        assert card.top[0].act == pytest.approx(card.max_act, rel=1e-6)
        assert len({c.doc for c in card.top}) == len(card.top)  # one top context per document
        for ctx in card.top[:2] + card.weak[:1]:
            if ctx.doc not in recomputed:
                recomputed[ctx.doc] = emb.encode_tokens(docs[ctx.doc])
            again = recomputed[ctx.doc]
            assert again.acts[ctx.pos, card.latent] == pytest.approx(ctx.act, rel=1e-4, abs=1e-5)
            assert ctx.acts[ctx.peak] == pytest.approx(ctx.act, rel=1e-3, abs=1e-3)
            assert ctx.ids[ctx.peak] == again.token_ids[ctx.pos] == ctx.token_id
    # density and mean activation agree with a direct count over the corpus
    full = emb.encode_tokens_batch(texts)
    col = np.concatenate([a.acts[:, 17].toarray().ravel() for a in full])
    card = store.card(17)
    assert card.n_fire == int((col > 0).sum())
    assert card.density == pytest.approx((col > 0).mean())
    assert card.mean_act == pytest.approx(col[col > 0].mean(), rel=1e-4)


def test_interrupted_build_resumes_to_the_same_cards(corpus, tmp_path, monkeypatch):
    texts, sources, _, _ = corpus
    sae = random_sae(tmp_path / "sae", d_sae=128, k=8)
    emb = SAEEmbedder("minilm", str(sae), device="cpu", cache_dir=False)
    real, calls = emb.encode_tokens_batch, []

    def flaky(docs, *a, **k):
        calls.append(len(docs))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(docs, *a, **k)

    monkeypatch.setattr(emb, "encode_tokens_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_cards(emb, texts, sources, chunk_docs=6, store_dir=tmp_path / "a", show_progress_bar=False)
    partial = LatentStore.for_sae(emb.sae.content_hash, tmp_path / "a")
    assert partial.meta["docs_done"] == 6 and not partial.complete
    resumed = build_cards(emb, texts, sources, chunk_docs=6, store_dir=tmp_path / "a", show_progress_bar=False)
    assert calls[2:] == [6, 4]  # continued after the committed chunk
    monkeypatch.setattr(emb, "encode_tokens_batch", real)
    fresh = build_cards(emb, texts, sources, chunk_docs=6, store_dir=tmp_path / "b", show_progress_bar=False)
    a, b = resumed.contexts(), fresh.contexts()
    assert len(a) == len(b) > 0
    assert a.sort_values(["latent", "kind", "doc", "pos"]).drop(columns="acts").reset_index(drop=True).equals(
        b.sort_values(["latent", "kind", "doc", "pos"]).drop(columns="acts").reset_index(drop=True))
    with pytest.raises(ValueError, match="other settings"):
        build_cards(emb, texts[:5], sources[:5], store_dir=tmp_path / "b", show_progress_bar=False)


def test_offline_label_names_the_token_and_report_highlights_it(word_sae, word_store, monkeypatch):
    monkeypatch.setenv("SAEFEAT_LATENTS", str(word_store))
    emb = SAEEmbedder("minilm", str(word_sae), device="cpu")
    store = LatentStore.for_sae(emb.sae.content_hash)
    card = store.card(0)
    assert card.label.split(" | ")[0] == WORD
    assert card.top and all(c.tokens[c.peak].strip().lower() == WORD for c in card.top)

    with mlflow.start_run() as run:
        df = log_latent_report(emb, [0, 3], [2.5, -0.4], title="top latents")
    assert list(df.latent) == [0, 3] and df.label[0].startswith(WORD)
    assert f"«{WORD}" in df.example_1[0].lower() and df.density[0] == pytest.approx(card.density)
    page = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="top_latents.html"))
    marks = _check_html(page.read_text())
    assert any(text.lower() == WORD for cls, text in marks if cls == "peak")

    res = CliRunner().invoke(app, ["explain", f"sae={word_sae}", "latent=0"])
    assert res.exit_code == 0, res.output
    assert "latent 0" in res.output and WORD in res.output and "top activations" in res.output
    res = CliRunner().invoke(app, ["explain", f"sae={word_sae}", f"text=We walked along the {WORD} at dawn."])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if f"'{WORD}'" in line)
    assert re.search(rf"\b0\b \d+\.\d\d {WORD}", row)


def test_report_without_store_finds_contexts_in_the_texts(corpus, word_sae):
    texts, _, _, held_out = corpus
    emb = SAEEmbedder("minilm", str(word_sae), device="cpu")
    assert not LatentStore.for_sae(emb.sae.content_hash).exists
    docs = texts[:6] + held_out[:6]
    with mlflow.start_run() as run:
        df = log_latent_report(emb, [0], [1.0], texts=docs, title="sae latents", n_examples=2)
    assert df.label[0].startswith(WORD)
    assert all(f"«{WORD}" in df[c][0].lower() for c in ("example_1", "example_2"))
    fires = sum(WORD in d.lower().split() or f"{WORD}." in d.lower() or f"{WORD}," in d.lower() for d in docs)
    assert 0 < df.density[0] <= fires / 100
    page = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="sae_latents.html"))
    assert ("peak", WORD) in {(c, t.lower()) for c, t in _check_html(page.read_text())}


def test_detection_score_of_llm_labels(word_sae, word_store):
    emb = SAEEmbedder("minilm", str(word_sae), device="cpu")
    store = LatentStore.for_sae(emb.sae.content_hash, word_store)

    class RuleLabeller:
        """Labels with the most frequent marked token; detects by looking for the label's word."""

        def __init__(self, fixed: str | None = None):
            self.fixed = fixed

        def complete(self, prompt: str, max_tokens: int = 32) -> str:
            if "Answer with yes or no" in prompt:
                label = re.search(r'described as: "(.*)"', prompt).group(1)
                text = prompt.split("Text: ", 1)[1].lower()
                return "yes" if re.search(rf"\b{re.escape(label)}\b", text) else "no"
            marked = re.findall(r"<<(.*?)>>", prompt)
            return self.fixed or max(set(marked), key=marked.count)

    (lat, label, score), = label_store(store, emb, RuleLabeller(), latents=[0], n_holdout=8)
    assert (lat, label) == (0, WORD) and score == 1.0
    assert store.card(0).llm_label == WORD and store.card(0).llm_score == 1.0
    (_, _, wrong), = label_store(store, emb, RuleLabeller(fixed="zebra"), latents=[0], n_holdout=8)
    assert wrong == 0.5
    card = store.card(0)
    assert card.llm_label == "zebra" and card.best_label == card.label  # a chance-level LLM label is not used


def test_openai_compatible_client_speaks_chat_completions():
    seen = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen["path"] = self.path
            seen["auth"] = self.headers.get("Authorization")
            seen["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": " yes \n"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = OpenAICompatible(f"http://127.0.0.1:{server.server_port}/v1/", "tiny", api_key_env=None)
        assert client.complete(detection_prompt("rivers", "by the river"), max_tokens=3) == "yes"
    finally:
        server.shutdown()
    assert seen["path"] == "/v1/chat/completions" and seen["auth"] is None
    assert seen["body"]["model"] == "tiny" and seen["body"]["max_tokens"] == 3
    assert "by the river" in seen["body"]["messages"][0]["content"]


def test_logit_lens_reads_the_unembedding(smollm2, tmp_path):
    from saefeat.explain.logit_lens import final_norm, logit_lens

    tok = smollm2.tokenizer
    target = tok(" harbour", add_special_tokens=False)["input_ids"]
    sae = SAE(SAEConfig(d_in=smollm2.d_model, d_sae=4, architecture="topk", k=1, host="smollm2", layer=9))
    row = smollm2.model.get_output_embeddings().weight[target[0]] / final_norm(smollm2.model).weight
    with torch.no_grad():  # decoder rows that, after the final RMSNorm's gain, point along the token's unembedding
        sae.W_dec.normal_(0, 0.01)
        sae.W_dec[0] = row
        sae.W_dec[1] = -row
    promotes, suppresses = logit_lens(smollm2, sae, k=5)
    name = tok.convert_tokens_to_string(tok.convert_ids_to_tokens(target[:1]))
    assert name in promotes[0] and name in suppresses[1] and name not in promotes[1]


def _check_html(page: str) -> list[tuple[str, str]]:
    """Parse the page, fail on unbalanced tags; return (class, text) of every <mark>."""

    class Checker(html.parser.HTMLParser):
        void = {"meta", "br", "hr", "img", "link", "input"}

        def __init__(self):
            super().__init__()
            self.stack, self.marks, self.doctype = [], [], False

        def handle_decl(self, decl):
            self.doctype = decl.lower() == "doctype html"

        def handle_starttag(self, tag, attrs):
            if tag not in self.void:
                self.stack.append(tag)
            if tag == "mark":
                self.marks.append([dict(attrs).get("class", ""), ""])

        def handle_endtag(self, tag):
            assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> in {self.stack[-3:]}"
            self.stack.pop()

        def handle_data(self, data):
            if self.stack and self.stack[-1] == "mark":
                self.marks[-1][1] += data

    checker = Checker()
    checker.feed(page)
    checker.close()
    assert checker.doctype and not checker.stack and checker.marks
    return [tuple(m) for m in checker.marks]


def test_store_labels_and_firing_counts_agree_with_the_cards(corpus, tmp_path):
    from saefeat.explain.cards import LLM_LABEL_MIN_SCORE
    from saefeat.tabular.concepts import store_labels

    texts, sources = corpus[0][:6], corpus[1][:6]
    emb, store = _build(random_sae(tmp_path / "sae", d_sae=64, k=8), texts, sources, store_dir=tmp_path / "latents",
                        chunk_docs=2)
    store.con.execute(f"VACUUM INTO '{tmp_path / 'compacted.sqlite'}'")  # a finished store is compacted already
    pages = store.con.execute("PRAGMA page_count").fetchone()[0]
    assert pages == LatentStore(tmp_path / "compacted.sqlite").con.execute("PRAGMA page_count").fetchone()[0]
    cards = store.cards(list(range(64)), n_top=0, n_weak=0)
    counts = store.firing_counts()
    assert counts.dtype == np.int64 and counts.tolist() == [c.n_fire for c in cards]
    assert 0 < counts.sum() <= 8 * store.n_tokens  # a TopK SAE with k=8 fires at most 8 latents per token
    labelled = [c.latent for c in cards if c.label]
    good, weak = labelled[0], labelled[1]
    store.set_llm_label(good, "a confident label", LLM_LABEL_MIN_SCORE + 0.1)
    store.set_llm_label(weak, "a label at chance", LLM_LABEL_MIN_SCORE - 0.3)
    labels = store.labels()
    assert labels == {c.latent: c.best_label for c in store.cards(list(range(64)), n_top=0, n_weak=0)
                      if c.best_label}
    assert labels[good] == "a confident label" and labels[weak] == cards[weak].label
    assert store_labels(emb.sae.content_hash, str(tmp_path / "latents")) == labels
    assert store_labels(emb.sae.content_hash, str(tmp_path / "elsewhere")) is None
    missing = LatentStore(tmp_path / "none.sqlite")
    assert missing.labels() == {} and missing.firing_counts().size == 0 and not missing.exists


def test_cards_shipped_beside_a_default_sae_are_read_only_fallbacks(tmp_path, monkeypatch):
    import saefeat.sae.formats as formats
    from saefeat.errors import SaefeatError
    from saefeat.explain.store import LatentStore

    monkeypatch.setattr(formats, "DEFAULTS_DIR", tmp_path / "weights")
    monkeypatch.setenv("SAEFEAT_LATENTS", str(tmp_path / "mine"))
    shipped = LatentStore(tmp_path / "weights" / "minilm" / "latent_cards" / "abc123.sqlite")
    with shipped.con:
        shipped.set_meta({"corpus": "gutenberg (400 passages)"})
    shipped.close()
    found = LatentStore.for_sae("abc123")
    assert found.read_only and found.meta["corpus"].startswith("gutenberg")
    with pytest.raises(SaefeatError, match="shipped with the package"):
        found.delete()
    assert not LatentStore.for_sae("abc123", for_writing=True).read_only  # a build writes the user's own store
    assert not LatentStore.for_sae("other").exists


@pytest.mark.parametrize("model,layer", [("minilm", None), ("minilm", 3), ("smollm2", None)])
def test_the_shipped_saes_have_their_cards_on_a_fresh_install(model, layer, tmp_path, monkeypatch):
    from saefeat.explain.store import LatentStore
    from saefeat.sae.formats import default_sae_path, load_sae

    monkeypatch.setenv("SAEFEAT_LATENTS", str(tmp_path / "none-built"))
    sae = load_sae(default_sae_path(model, layer))
    store = LatentStore.for_sae(sae.content_hash)
    assert store.read_only and store.meta["corpus"].startswith("gutenberg")  # public-domain text only
    cards = [c for c in store.cards(list(range(0, sae.d_sae, sae.d_sae // 16)), n_top=3) if c.top]
    assert len(cards) >= 12 and all(c.best_label for c in cards)
    assert not (tmp_path / "none-built").exists()  # reading wrote nothing
