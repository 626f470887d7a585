"""Calibration and evaluation text: where it comes from and how it is cut into token windows."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from ..config import OffloadPruneError

TEXT_SUFFIXES = (".txt", ".md", ".text")
C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
C4_EVAL_DOCUMENTS = 1100
C4_MAX_DRAWS = 1000


def load_text(spec: str, split: str = "train") -> str:
    """A text file, a folder of text files, a jsonl with a `text` field, or `wikitext2` / `c4`
    through `datasets` (which must find them locally when there is no network)."""
    if spec in ("wikitext2", "c4"):
        return _named_dataset(spec, split)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl",))
        if not files:
            raise OffloadPruneError(f"{path}: no .txt or .jsonl files")
        return "\n\n".join(load_text(str(p)) for p in files)
    if not path.is_file():
        raise OffloadPruneError(f"{spec}: no such file or folder (nor one of the names wikitext2, c4)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise OffloadPruneError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); give a plain text, "
                                ".jsonl or a folder of them") from None
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError):
                raise OffloadPruneError(f"{path}:{number}: not a JSON object with a 'text' field") from None
        return "\n\n".join(texts)
    return text


def _named_dataset(name: str, split: str) -> str:
    """WikiText-2 joined as the reference scripts join it. C4's evaluation text is the first 1100
    validation documents joined with spaces (theirs, too); C4 calibration never comes through here:
    `calibration_windows` samples its documents one by one."""
    if name == "wikitext2":
        rows = dataset_rows("wikitext2", split)
        return "\n\n".join(rows[i] for i in range(len(rows)))
    rows = dataset_rows("c4", "validation")
    return " ".join(rows[i] for i in range(min(C4_EVAL_DOCUMENTS, len(rows))))


def dataset_rows(name: str, split: str):
    """The `text` column of a named dataset, read one row at a time (never materialised whole)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise OffloadPruneError(f"{name} needs the `datasets` package (pip install datasets) and a local "
                                "copy of the data; or pass a local text / jsonl file") from None
    try:
        if name == "wikitext2":
            table = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        else:
            split = "train" if split == "train" else "validation"
            table = load_dataset("allenai/c4", data_files={split: C4_FILES[split]}, split=split)
    except Exception as exc:
        raise OffloadPruneError(f"could not load {name} through `datasets` "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return _TextColumn(table)


class _TextColumn:
    def __init__(self, table):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> str:
        return self.table[index]["text"]


def text_size_of(spec: str) -> int:
    """Bytes of a local text file; 0 for a named dataset (not read to plan a run)."""
    path = Path(spec).expanduser()
    return path.stat().st_size if path.is_file() else 0


def calibration_windows(spec: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> tuple[torch.Tensor, int]:
    """(windows, characters of text tokenized at once). C4 as the SparseGPT/Wanda loaders draw it:
    a random document long enough, then a random window in it, per sample; only those documents
    are tokenized (tokenizing the whole shard would take ~200 M tokens and tens of GB)."""
    if spec != "c4":
        text = load_text(spec)
        return sample_windows(tokenize(tokenizer, text), nsamples, seqlen, seed), len(text)
    rows = dataset_rows("c4", "train")
    rng = random.Random(seed)
    windows, longest = [], 0
    for _ in range(nsamples):
        for _ in range(C4_MAX_DRAWS):
            document = rows[rng.randint(0, len(rows) - 1)]
            ids = tokenize(tokenizer, document)
            longest = max(longest, len(document))
            if ids.numel() > seqlen:
                break
        else:
            raise OffloadPruneError(f"c4: no document longer than --seqlen {seqlen} tokens in {C4_MAX_DRAWS} draws")
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start:start + seqlen])
    return torch.stack(windows), longest


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one id sequence, special tokens as the tokenizer adds them (a single BOS at
    the start for Llama), as the reference scripts tokenize; the model's length limit does not apply."""
    logger = logging.getLogger("transformers.tokenization_utils_base")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "sequence longer than the model maximum" is expected
    try:
        ids = tokenizer(text)["input_ids"]
    finally:
        logger.setLevel(level)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at random offsets, as the SparseGPT/Wanda loaders draw them."""
    if ids.numel() <= seqlen:
        raise OffloadPruneError(f"calibration text has {ids.numel()} tokens; --seqlen {seqlen} needs more "
                                "than that (give more text or a smaller --seqlen)")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """Consecutive non-overlapping windows, the last partial one dropped (as SparseGPT/Wanda evaluate)."""
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise OffloadPruneError(f"evaluation text has {ids.numel()} tokens, fewer than one --seqlen {seqlen} window")
    return ids[: count * seqlen].reshape(count, seqlen)
