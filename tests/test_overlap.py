"""--overlap-io: the next block read and the last one written on helper threads, the same files."""
import os
import threading
from collections import defaultdict

import pytest

from offload_prune.disk import checkpoint
from offload_prune.disk.checkpoint import CheckpointReader, ShardLayout
from offload_prune.disk.durable import tensor_bytes
from offload_prune.cli import main
from offload_prune.runtime.overlap import Behind, ReadAhead

from conftest import folder_digests, quick_args


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    return checkpoint_factory(num_layers=4, hidden=64, intermediate=128, max_shard_size="40KB")


args = quick_args


@pytest.mark.parametrize("method,activations", [("wanda", "ram"), ("sparsegpt", "disk")])
def test_overlapped_run_writes_the_same_files(model, tmp_path, method, activations):
    common = ("--prune_method", method, "--offload-activations", activations)
    assert main(args(model, tmp_path / "serial", *common, "--overlap-io", "off")) == 0
    assert main(args(model, tmp_path / "overlapped", *common, "--overlap-io", "on")) == 0
    assert folder_digests(tmp_path / "overlapped") == folder_digests(tmp_path / "serial")


@pytest.mark.parametrize("overlap", ["on", "off"])
def test_blocks_are_read_ahead_and_written_behind_on_helper_threads(model, tmp_path, monkeypatch, overlap):
    writes, reads = [], []
    write_unit, read = ShardLayout.write_unit, CheckpointReader.read

    def recording_write(self, unit, folder, tensors):
        writes.append((unit, threading.current_thread().name))
        return write_unit(self, unit, folder, tensors)

    def recording_read(self, names):
        reads.append((names, threading.current_thread().name))
        return read(self, names)

    monkeypatch.setattr(ShardLayout, "write_unit", recording_write)
    monkeypatch.setattr(CheckpointReader, "read", recording_read)
    assert main(args(model, tmp_path / "out", "--overlap-io", overlap)) == 0

    block_writes = [thread for unit, thread in writes if 1 <= unit <= 4]
    block_reads = [thread for names, thread in reads if names and all(".layers." in n for n in names)]
    assert len(block_writes) == 4 and len(block_reads) == 4
    if overlap == "on":
        assert all(t.startswith("block-writer") for t in block_writes)
        # block 0 is read when it is needed; each later one while the block before it computes
        assert block_reads[0] == "MainThread" and all(t.startswith("read-ahead") for t in block_reads[1:])
    else:
        assert set(block_writes) | set(block_reads) == {"MainThread"}


def test_a_failed_job_surfaces_at_the_next_wait_and_jobs_keep_their_order():
    done = []
    behind = Behind(True, "test-writer")
    behind.submit(lambda: done.append(1))
    behind.submit(lambda: done.append(2))  # waits for the first
    behind.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        behind.wait()
    behind.close()
    assert done == [1, 2]


def test_read_ahead_reads_inline_when_another_key_is_asked():
    calls = []

    def read(names):
        calls.append((tuple(names), threading.current_thread().name))
        return {n: n for n in names}

    ahead = ReadAhead(read, enabled=True)
    ahead.start(1, ["b"])
    assert ahead.take(1, ["b"]) == {"b": "b"}
    ahead.start(2, ["c"])
    assert ahead.take(5, ["x"]) == {"x": "x"}  # a resume elsewhere: the started read is not handed out
    ahead.close()
    assert [c[0] for c in calls] == [("b",), ("c",), ("x",)]
    assert calls[0][1].startswith("read-ahead") and calls[2][1] == "MainThread"


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux's")
def test_a_read_asks_the_disk_for_exactly_its_tensors_bytes(model, monkeypatch):
    """safetensors maps tensors without reading them, so a read-ahead thread would read nothing: it asks
    the kernel for the tensors' bytes instead. The spans must be where the tensors lie, and the requests
    must cover them and nothing else, in pieces the kernel reads whole."""
    reader = CheckpointReader(str(model))
    for name, (begin, end) in reader.spans.items():
        with open(model / reader.weight_map[name], "rb") as f:
            f.seek(begin)
            assert f.read(end - begin) == bytes(tensor_bytes(reader.read([name])[name].contiguous()))
    asked = defaultdict(list)
    monkeypatch.setattr(checkpoint, "DISK_REQUEST_BYTES", 1000)  # this model's tensors span several pieces

    def recording_fadvise(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_WILLNEED and 0 < length <= 1000
        asked[os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))].append((offset, offset + length))

    monkeypatch.setattr(os, "posix_fadvise", recording_fadvise)
    names = [n for n in reader.weight_map if n.startswith("model.layers.1.")]
    reader.read(names)
    wanted = defaultdict(set)
    for name in names:
        wanted[reader.weight_map[name]].update(range(*reader.spans[name]))
    assert len(wanted) > 1  # the block lies in several shards
    assert {shard: {b for begin, end in spans for b in range(begin, end)} for shard, spans in asked.items()} == wanted
