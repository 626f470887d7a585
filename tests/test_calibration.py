import json

import pytest
import torch

from offload_prune.calibration import eval_windows, load_text, sample_windows
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
