import json

import pytest
import torch

from offload_prune.data.calibration import eval_windows, load_text, sample_windows
from offload_prune.config import OffloadPruneError


def test_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "2.txt").write_text("two")
    (folder / "1.txt").write_text("one")
    (folder / "skip.bin").write_bytes(b"\0")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    assert load_text(str(tmp_path / "a.txt")) == "alpha"
    assert load_text(str(folder)) == "one\n\ntwo"
    assert load_text(str(jsonl)) == "first\n\nsecond"


def test_bad_sources(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(OffloadPruneError, match="bad.jsonl:1"):
        load_text(str(bad))
    with pytest.raises(OffloadPruneError, match="no such file"):
        load_text(str(tmp_path / "missing.txt"))


def test_windows_are_seeded_and_in_range():
    ids = torch.arange(1000)
    a, b, c = (sample_windows(ids, 16, 100, seed) for seed in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (16, 100)
    assert bool(((a[:, 1:] - a[:, :-1]) == 1).all())  # contiguous slices of the text
    with pytest.raises(OffloadPruneError, match="more"):
        sample_windows(ids, 1, 1000, 0)


def test_seqlen_is_not_limited_by_the_model():
    # windows longer than any max_position_embeddings are the caller's choice
    assert sample_windows(torch.arange(100_000), 2, 40_000, 0).shape == (2, 40_000)


def test_eval_windows_drop_the_partial_tail():
    w = eval_windows(torch.arange(1050), 100, None)
    assert w.shape == (10, 100) and w[-1, -1] == 999
    assert eval_windows(torch.arange(1050), 100, 3).shape == (3, 100)


class CountingTokenizer:
    """The demo byte tokenizer, counting the characters it is asked to tokenize."""

    def __init__(self):
        from offload_prune.demo import byte_tokenizer
        self.inner, self.characters = byte_tokenizer(), 0

    def __call__(self, text):
        self.characters += len(text)
        return self.inner(text)


@pytest.fixture
def fake_c4(monkeypatch):
    """A stand-in for the C4 shard (no network here): 5000 documents, most shorter than a window."""
    import random

    import offload_prune.data.calibration as calibration
    rng = random.Random(7)
    documents = [" ".join(f"w{rng.randint(0, 999)}" for _ in range(rng.choice([5, 20, 400]))) for _ in range(5000)]
    requested = []

    def rows(name, split):
        requested.append((name, split))
        return documents
    monkeypatch.setattr(calibration, "dataset_rows", rows)
    return documents, requested


def test_c4_samples_documents_as_the_reference_loaders(fake_c4):
    from offload_prune.data.calibration import calibration_windows, tokenize
    documents, requested = fake_c4
    tokenizer = CountingTokenizer()
    windows, longest = calibration_windows("c4", tokenizer, nsamples=16, seqlen=256, seed=3)
    assert windows.shape == (16, 256) and requested == [("c4", "train")]
    # only the drawn documents were tokenized, never the whole shard
    assert tokenizer.characters < sum(map(len, documents)) / 20
    # each window is a contiguous slice of one document's tokens
    tokens = [_as_bytes(tokenize(tokenizer.inner, d)) for d in documents if len(d) > 256]
    for window in windows:
        assert any(_contains(ids, _as_bytes(window)) for ids in tokens)
    again, _ = calibration_windows("c4", CountingTokenizer(), nsamples=16, seqlen=256, seed=3)
    other, _ = calibration_windows("c4", CountingTokenizer(), nsamples=16, seqlen=256, seed=4)
    assert torch.equal(windows, again) and not torch.equal(windows, other)


def _as_bytes(ids: torch.Tensor) -> bytes:
    return ids.to(torch.int64).numpy().tobytes()


def _contains(ids: bytes, window: bytes) -> bool:
    """Whether `window` is a contiguous run of `ids` (a search of their bytes, at whole-token offsets)."""
    at = ids.find(window)
    while at >= 0 and at % 8:
        at = ids.find(window, at + 1)
    return at >= 0


def test_c4_evaluation_text_is_the_first_validation_documents(fake_c4):
    documents, requested = fake_c4
    assert load_text("c4", split="test") == " ".join(documents[:1100])
    assert requested == [("c4", "validation")]


def test_c4_without_long_enough_documents_is_refused(monkeypatch):
    import offload_prune.data.calibration as calibration
    monkeypatch.setattr(calibration, "dataset_rows", lambda name, split: ["short text"] * 10)
    with pytest.raises(OffloadPruneError, match="no document longer than --seqlen 64 tokens in 1000 draws"):
        calibration.calibration_windows("c4", CountingTokenizer(), 2, 64, 0)
