"""Reading a safetensors checkpoint one tensor group at a time, and writing the pruned one.

Shards are opened only for the duration of a read: safe_open memory-maps the file, and a
mapping kept open would count every page ever touched towards the process's RSS.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from ..config import OffloadPruneError
from . import durable
from .compressed import PackedWeights, quantization_config
from .fp8 import BlockFP8Weights, fp8_config
from .durable import FileRecord

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Everything beside the weights that a user expects to find in a model folder.
SIDE_FILE_PATTERNS = ("*.json", "*.model", "*.txt", "*.tiktoken", "*.py", "*.jinja")
HUB_PATTERNS = ["*.safetensors", *SIDE_FILE_PATTERNS]
#: Linux starts at most one readahead window (read_ahead_kb: 128 KiB unless the disk says otherwise) per
#: WILLNEED request, whatever the length asked: a block is asked for in pieces of this size (measured here,
#: 90 MiB asked at once: 8 MiB read; in 128 KiB pieces: all of it, in 19 ms of system calls).
DISK_REQUEST_BYTES = 128 << 10


def resolve_model_path(model: str) -> Path:
    """A local folder as is; otherwise a hub id fetched (weights as safetensors only) into the HF cache."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise OffloadPruneError(f"--model {model}: not a folder")
        return path.resolve()
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise OffloadPruneError(f"--model {model}: no such folder")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(model, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, gated, missing: all end the run the same way
        raise OffloadPruneError(f"--model {model}: not a local folder and the hub download failed "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


class CheckpointReader:
    """Config, tensor map and per-tensor reads of a safetensors checkpoint folder."""

    def __init__(self, model: str):
        self.folder = resolve_model_path(model)
        if not (self.folder / "config.json").is_file():
            raise OffloadPruneError(f"{self.folder}: no config.json, not a Hugging Face model folder")
        try:
            self.config: PretrainedConfig = AutoConfig.from_pretrained(self.folder)
        except Exception as exc:
            raise OffloadPruneError(f"{self.folder}/config.json: {str(exc).splitlines()[0]}") from None
        self.weight_map = self._read_weight_map()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        # Where each tensor's bytes lie in its shard: [begin, end) from the start of the file.
        self.spans: dict[str, tuple[int, int]] = {}
        self._headers: dict[str, bytes] = {}  # each shard's JSON header, as read once here (for `identity`)
        self._check_shards()
        # What is stored; weight_map, shapes and dtypes say what the modules load, which differs only for
        # a quantized checkpoint: a compressed-tensors one (its packed parts stand for one dense weight each)
        # or a block-scaled FP8 one (each FP8 weight and its scales stand for a 16-bit weight).
        self.stored_map = dict(self.weight_map)
        quantized, fp8 = quantization_config(self.config), fp8_config(self.config)
        self.packed = PackedWeights(quantized, self.shapes, self._read_stored) if quantized else None
        self.fp8 = BlockFP8Weights(fp8, self.shapes, self.dtypes, _sixteen_bits(self.config)) if fp8 else None
        self.converted = self.packed or self.fp8
        for name, parts in (self.converted.parts if self.converted else {}).items():
            stored = list(parts.values())
            self.weight_map[name] = self.weight_map[stored[0]]
            self.shapes[name] = self.converted.shapes[name]
            self.dtypes[name] = self.dtypes[parts["weight_scale"]] if self.packed else self.fp8.dtypes[name]
            for part in stored:
                if part != name:
                    del self.weight_map[part], self.shapes[part], self.dtypes[part]

    def _read_weight_map(self) -> dict[str, str]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError) as exc:
                raise OffloadPruneError(f"{index}: unreadable index ({exc})") from None
        if (self.folder / SINGLE_NAME).is_file():
            return {name: SINGLE_NAME for name in self._open(SINGLE_NAME).keys()}
        raise OffloadPruneError(f"{self.folder}: no {INDEX_NAME} or {SINGLE_NAME} "
                                "(only safetensors checkpoints are supported)")

    def _open(self, shard: str):
        path = self.folder / shard
        if not path.is_file():
            raise OffloadPruneError(f"{path}: shard listed in the index is missing")
        try:
            return safe_open(path, framework="pt", device="cpu")
        except Exception as exc:
            raise OffloadPruneError(f"{path}: unreadable safetensors shard "
                                    f"({str(exc).splitlines()[0]}); truncated download?") from None

    def _check_shards(self) -> None:
        """Every shard opens (safetensors checks the header against the file size) and holds its tensors;
        their shapes, dtypes and byte spans."""
        for shard, names in _by_shard(self.weight_map).items():
            with self._open(shard) as handle:
                present = set(handle.keys())
                header_bytes, header = _header(self.folder / shard)
                self._headers[shard] = header_bytes
                data_start = 8 + len(header_bytes)
                for name in names:
                    if name not in present:
                        raise OffloadPruneError(f"{self.folder / shard}: tensor {name} listed in the index is missing")
                    piece = handle.get_slice(name)
                    self.shapes[name] = tuple(piece.get_shape())
                    self.dtypes[name] = _SAFETENSORS_DTYPES[piece.get_dtype()]
                    begin, end = header[name]["data_offsets"]
                    self.spans[name] = (data_start + begin, data_start + end)

    def shard_files(self) -> list[str]:
        return sorted(set(self.stored_map.values()))

    def max_shard_bytes(self) -> int:
        return max((self.folder / shard).stat().st_size for shard in self.shard_files())

    def nbytes(self, name: str) -> int:
        numel = 1
        for dim in self.shapes[name]:
            numel *= dim
        return numel * self.dtypes[name].itemsize

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, in their stored dtype, on the CPU.

        safetensors maps them from the file without reading them: the disk is read when they are first
        used (converted on load), on whichever thread that is. So their bytes are asked of the disk here
        (posix_fadvise WILLNEED: the kernel reads them into the page cache in the background); on the
        read-ahead thread, the next block comes off the disk while the main thread computes."""
        if self.converted:
            return self.converted.dense(self._read_stored(self.converted.stored_names(names)), names)
        return self._read_stored(names)

    def _read_stored(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for shard, shard_names in _by_shard({n: self.stored_map[n] for n in names}).items():
            self._ask_disk(shard, shard_names)
            with self._open(shard) as handle:
                for name in shard_names:
                    out[name] = handle.get_tensor(name)
        return out

    def _ask_disk(self, shard: str, names: list[str]) -> None:
        if not hasattr(os, "posix_fadvise"):  # not on macOS: the first use reads the disk, as without it
            return
        fd = os.open(self.folder / shard, os.O_RDONLY)
        try:
            for begin, end in _merged(sorted(self.spans[name] for name in names)):
                for start in range(begin, end, DISK_REQUEST_BYTES):
                    os.posix_fadvise(fd, start, min(DISK_REQUEST_BYTES, end - start), os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def identity(self) -> dict:
        """What identifies this checkpoint for resuming, by content and cheap enough for 140 GB: the
        config and every shard's safetensors header (names, dtypes, shapes, offsets) and size. The
        folder's path is not part of it: a moved or copied checkpoint is the same checkpoint."""
        digest = hashlib.sha256((self.folder / "config.json").read_bytes())
        for shard in self.shard_files():
            path = self.folder / shard
            digest.update(shard.encode() + self._headers[shard])
            digest.update(str(path.stat().st_size).encode())
        return {"sha256_of_headers": digest.hexdigest()}


def _sixteen_bits(model_config) -> torch.dtype:
    """What a quantized checkpoint's weights are read as: config.json's 16-bit dtype, else bfloat16."""
    value = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    value = getattr(torch, value, None) if isinstance(value, str) else value
    return value if value in (torch.float16, torch.bfloat16) else torch.bfloat16


def _header(path: Path) -> tuple[bytes, dict]:
    """A safetensors file's JSON header, as bytes and parsed (the shard opened before, so it is well-formed)."""
    with open(path, "rb") as f:
        header = f.read(int.from_bytes(f.read(8), "little"))
    return header, json.loads(header)


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted byte ranges with the adjacent and overlapping ones joined: one disk request per run of tensors."""
    out: list[tuple[int, int]] = []
    for begin, end in spans:
        if out and begin <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((begin, end))
    return out


def _by_shard(weight_map: dict[str, str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for name, shard in weight_map.items():
        groups[shard].append(name)
    return dict(groups)

#: In the order safetensors lays tensors out in a file (widest elements first; ties in its own order).
_SAFETENSORS_DTYPES = {
    "I64": torch.int64, "F64": torch.float64, "F32": torch.float32, "I32": torch.int32, "BF16": torch.bfloat16,
    "F16": torch.float16, "I16": torch.int16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_LAYOUT_RANK = {dtype: rank for rank, dtype in enumerate(_SAFETENSORS_DTYPES.values())}


class ShardLayout:
    """Where each output tensor goes, fixed before the run starts.

    Each unit (one decoder block, or the tensors outside the blocks) is packed into its own
    shards, none larger than the input's largest shard, so a finished block can be written at
    once, on its own, under its final file name.
    """

    def __init__(self, units: list[list[str]], nbytes: dict[str, int], max_shard_bytes: int):
        self.unit_shards: list[list[list[str]]] = [_pack(unit, nbytes, max_shard_bytes) for unit in units]
        total = sum(len(shards) for shards in self.unit_shards)
        self.file_names: list[list[str]] = []
        number = 0
        for shards in self.unit_shards:
            names = []
            for _ in shards:
                number += 1
                names.append(f"model-{number:05d}-of-{total:05d}.safetensors")
            self.file_names.append(names)
        self.nbytes = nbytes
        self.total_size = sum(nbytes[name] for unit in units for name in unit)
        self.group_units: dict[int, list[int]] = {}  # block -> units of its expert groups (stream/output.py)

    def weight_map(self) -> dict[str, str]:
        return {name: file for shards, files in zip(self.unit_shards, self.file_names)
                for shard, file in zip(shards, files) for name in shard}

    def write_unit(self, unit: int, folder: Path, tensors: dict[str, torch.Tensor]) -> dict[str, FileRecord]:
        """Write one unit's shards under their final names; returns what the manifest records."""
        records = {}
        for shard, file in zip(self.unit_shards[unit], self.file_names[unit]):
            contents = {name: tensors[name] for name in shard}  # made contiguous by save_shard, one at a time
            records[file] = durable.write_file(folder / file, lambda tmp: save_shard(contents, tmp))
        return records

    def largest_shard_bytes(self) -> int:
        return max(sum(self.nbytes[name] for name in shard) for shards in self.unit_shards for shard in shards)

    def index_text(self, total_size: int) -> str:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(self.weight_map().items()))}
        return json.dumps(index, indent=2) + "\n"

    def written_totals(self, folder: Path) -> tuple[int, int]:
        """(parameters, bytes) of the tensors written to `folder`, from the shards' headers: what was
        written, whatever shapes the run gave the tensors."""
        numel = nbytes = 0
        for file in sorted(set(self.weight_map().values())):
            with safe_open(folder / file, framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    count = math.prod(piece.get_shape())
                    numel += count
                    nbytes += count * _SAFETENSORS_DTYPES[piece.get_dtype()].itemsize
        return numel, nbytes


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> int:
    """Write a safetensors file and return its CRC-32, summed from the bytes as they are written: nothing
    is read back, and each tensor's bytes go to the file from its own memory (safetensors' save_file first
    copies them all into one buffer), around the page cache where it can (durable.write_around_cache).
    The layout is safetensors': an 8-byte little-endian header size, the JSON header padded with spaces
    to 8 bytes, then the tensors' bytes with no gap in safetensors' order (by dtype, the widest elements
    first, so each tensor starts at a multiple of its element size; then by name): the bytes
    safetensors would write."""
    order = sorted(tensors, key=lambda name: (_LAYOUT_RANK[tensors[name].dtype], name))
    entries, offset = {}, 0
    for name in order:
        tensor = tensors[name]
        entries[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":"),
                        ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)
    start = len(header).to_bytes(8, "little") + header

    def pieces():
        yield memoryview(start)
        for name in order:
            yield durable.tensor_bytes(tensors[name].contiguous())  # a copy only of a strided view, one at a time

    return durable.write_around_cache(path, pieces)


def _pack(names: list[str], nbytes: dict[str, int], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + nbytes[name] > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    return [shard for shard in shards if shard]


def side_files(src: Path) -> list[Path]:
    """Config, generation config, tokenizer and the like; never weights or a stale index."""
    return [path for pattern in SIDE_FILE_PATTERNS for path in sorted(src.glob(pattern))
            if path.is_file() and path.name not in (INDEX_NAME, "report.json")]
