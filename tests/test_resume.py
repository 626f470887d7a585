"""A run stopped at any filesystem step and resumed writes files identical to an uninterrupted run.

The steps are not chosen by hand: an uninterrupted run logs every write, fsync, rename and delete
it makes (offload_prune/durable.py), and the sweep kills a fresh run at each of them in turn.
"""
import errno
import json
import os

import pytest

from conftest import CrashWorker, folder_digests, with_quiet_blocks


@pytest.fixture(scope="module")
def resume_model(checkpoint_factory):
    # Shards of ~40 KB split every block over several files, so kills land between a block's shards.
    return checkpoint_factory(num_layers=3, hidden=64, intermediate=128, max_shard_size="40KB")


@pytest.fixture(scope="module")
def calibration_text(resume_model, tmp_path_factory):
    """A short text: tokenizing the whole demo text would be most of each of the sweep's ~500 runs."""
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text((resume_model / "demo.txt").read_text()[:2000])
    return path


@pytest.fixture(scope="module")
def prune_args(calibration_text):
    def args(model, save, *extra):
        return ["--model", model, "--save", save, "--prune_method", "wanda", "--calib-data", calibration_text,
                "--nsamples", 4, "--seqlen", 32, "--quiet", *extra]
    return args


@pytest.fixture(scope="module")
def worker(resume_model, prune_args, tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker")
    crash_worker = CrashWorker(prune_args(resume_model, folder / "warm-up"), folder)
    yield crash_worker
    crash_worker.close()


@pytest.fixture(scope="module")
def uninterrupted(resume_model, worker, prune_args, tmp_path_factory):
    save = tmp_path_factory.mktemp("uninterrupted") / "out"
    code, printed = worker.run(*prune_args(resume_model, save))
    assert code == 0, printed
    return folder_digests(save)


def kill_then_resume(worker, args, step, second_kill=None):
    """Kill a fresh run at `step`, resume it (killed again at `second_kill` if given, then resumed
    once more); returns what went wrong, or None."""
    code, printed = worker.run(*args, env={"OFFLOAD_PRUNE_KILL_AT_STEP": str(step)})
    if code != -9:
        return f"not killed (exit {code}): {printed[-300:]}"
    if second_kill is not None:
        code, printed = worker.run(*args, env={"OFFLOAD_PRUNE_KILL_AT_STEP": str(second_kill)})
        if code not in (-9, 0):
            return f"second run exit {code}: {printed[-300:]}"
    code, printed = worker.run(*args)
    if code != 0 or "Traceback" in printed:
        return f"resume exit {code}: {printed[-300:]}"
    return None


def every(n: int):
    """Pick every n-th logged step and each of the last twelve (the write phase and the report)."""
    return lambda steps: [step if k % n == 0 or k >= len(steps) - 12 else None for k, step in enumerate(steps)]


@pytest.mark.parametrize("activations", ["ram", "disk"])
def test_kill_at_every_filesystem_step_then_resume_is_identical(resume_model, prune_args, worker, uninterrupted, tmp_path,
                                                                 activations):
    """Every step with the cache in RAM; with it on disk (its files are the difference) every third."""
    args = lambda save: prune_args(resume_model, save, "--offload-activations", activations)  # noqa: E731
    steps = worker.steps(*args(tmp_path / "logged"))
    assert {s.split()[0] for s in steps} == {"mkdir", "write", "fsync", "rename", "fsync-dir", "delete"}
    chosen = steps if activations == "ram" else every(3)(steps)
    failures = sweep_kills(worker, args, chosen, uninterrupted, tmp_path)
    swept = sum(step is not None for step in chosen)
    print(f"{activations}: {swept} kill points swept, {swept - len(failures)} identical")
    assert not failures, "\n".join(failures)


def sweep_kills(worker, args, steps, expected, tmp_path):
    """Kill a fresh run at each step in turn (None: not this one) and resume it; what went wrong at each
    failing step."""
    failures = []
    for k in range(1, len(steps) + 1):
        if steps[k - 1] is None:
            continue
        save = tmp_path / f"k{k}"
        problem = kill_then_resume(worker, args(save), k)
        if problem is None and folder_digests(save) != expected:
            problem = "output differs from the uninterrupted run"
        if problem:
            failures.append(f"step {k} ({steps[k - 1]}): {problem}")
    return failures


def test_owl_dense_pass_killed_at_every_step_then_resumed_is_identical(resume_model, prune_args, worker, tmp_path):
    """OWL adds a dense pass over every block before pruning; it commits and resumes the same way."""
    args = lambda save: prune_args(resume_model, save, "--layer-sparsity", "owl")  # noqa: E731
    code, printed = worker.run(*args(tmp_path / "uninterrupted"))
    assert code == 0, printed
    expected = folder_digests(tmp_path / "uninterrupted")
    steps = worker.steps(*args(tmp_path / "logged"))
    uniform = worker.steps(*prune_args(resume_model, tmp_path / "uniform"))
    assert len(steps) > len(uniform) + 3 * 3  # the dense pass commits each of the 3 blocks (and re-captures)
    # From the first shard written on, the run is the pruning pass the sweeps above cover: skipped.
    first_shard = next(k for k, step in enumerate(steps) if step.startswith("write") and ".safetensors" in step)
    swept = steps[:first_shard + 1] + [None] * (len(steps) - first_shard - 1)
    failures = sweep_kills(worker, args, swept, expected, tmp_path)
    print(f"owl: {first_shard + 1} kill points swept (of {len(steps)}), {first_shard + 1 - len(failures)} identical")
    assert not failures, "\n".join(failures)


def test_shortgpt_killed_at_every_other_step_then_resumed_is_identical(resume_model, prune_args, worker, tmp_path):
    """ShortGPT's dense pass (with --angular: the steps of the plain pass, and the last-token states
    carried between blocks), its choice of blocks and the renumbered copies commit and resume the same way."""
    args = lambda save: prune_args(resume_model, save, "--prune_method", "shortgpt", "--remove-layers", 2,  # noqa: E731
                                   "--angular")
    code, printed = worker.run(*args(tmp_path / "uninterrupted"))
    assert code == 0, printed
    expected = folder_digests(tmp_path / "uninterrupted")
    steps = worker.steps(*args(tmp_path / "logged"))
    chosen = every(2)(steps)
    failures = sweep_kills(worker, args, chosen, expected, tmp_path)
    swept = sum(step is not None for step in chosen)
    print(f"shortgpt: {swept} kill points swept (of {len(steps)}), {swept - len(failures)} identical")
    assert not failures, "\n".join(failures)


def swept_identical(worker, args, tmp_path, label: str, pick=lambda steps: steps) -> list:
    """An uninterrupted run of `args(save)`, then a fresh run killed at each logged step (those `pick`
    keeps; None skips one) and resumed: every output must equal the uninterrupted one. Returns the steps."""
    code, printed = worker.run(*args(tmp_path / "uninterrupted"))
    assert code == 0, printed
    expected = folder_digests(tmp_path / "uninterrupted")
    steps = worker.steps(*args(tmp_path / "logged"))
    chosen = pick(steps)
    failures = sweep_kills(worker, args, chosen, expected, tmp_path)
    swept = sum(step is not None for step in chosen)
    print(f"{label}: {swept} kill points swept, {swept - len(failures)} identical")
    assert not failures, "\n".join(failures)
    return steps


def test_shrink_killed_every_few_steps_then_resumed_is_identical(resume_model, prune_args, worker, tmp_path):
    """Removed neurons and attention heads change the shapes written, the index's total and
    config.json; a resumed run still writes the same files."""
    args = lambda save: prune_args(resume_model, save, "--sparsity_type", "structured", "--shrink",  # noqa: E731
                                   "--prune-heads", 0.5)
    swept_identical(worker, args, tmp_path, "shrink", every(5))


def test_reconstruction_killed_at_every_other_step_then_resumed_is_identical(resume_model, prune_args, worker, tmp_path):
    """--reconstruct with the dense-stream target: the trained blocks, and the dense stream's own activation
    cache committed beside the pruned stream's, resume to the same bytes from every other step."""
    args = lambda save: prune_args(resume_model, save, "--reconstruct", "block", "--recon-target",  # noqa: E731
                                   "dense-stream", "--recon-steps", 4)
    steps = swept_identical(worker, args, tmp_path, "reconstruction", every(2))
    assert any("acts_00002.dense.bin" in step for step in steps)


def test_shortgpt_reconstruction_killed_every_few_steps_then_resumed_is_identical(checkpoint_factory, prune_args,
                                                                                  worker, tmp_path):
    """ShortGPT with --reconstruct: the kept blocks trained one committed stage each, the dense stream carried
    beside them from the removed block on (block 1 of 4: kept block 2 stands in for it, then block 3 trains on
    the dense stream), resume to the same bytes from every third step and each of the last twelve."""
    model = with_quiet_blocks(checkpoint_factory(num_layers=4, hidden=64, intermediate=128, max_shard_size="40KB"),
                              tmp_path / "model", [1])
    args = lambda save: prune_args(model, save, "--prune_method", "shortgpt", "--remove-layers", 1,  # noqa: E731
                                   "--reconstruct", "block", "--recon-target", "dense-stream", "--recon-steps", 4)
    steps = swept_identical(worker, args, tmp_path, "shortgpt reconstruction", every(3))
    assert json.loads((tmp_path / "uninterrupted" / "report.json").read_text())["block_removal"]["removed"] == [1]
    assert any("acts_00002.dense.bin" in step for step in steps)


def test_quantized_run_killed_at_every_step_then_resumed_is_identical(resume_model, prune_args, worker, tmp_path):
    """--quantize: the packed blocks (their own tensor names and sizes in the layout) and config.json's
    quantization_config resume to the same bytes from every third step and each of the last twelve (the
    head, index and config.json)."""
    pytest.importorskip("compressed_tensors")
    args = lambda save: prune_args(resume_model, save, "--quantize", "w4a16", "--quant-group-size", 32)  # noqa: E731
    swept_identical(worker, args, tmp_path, "quantized", every(3))
    assert ".weight_packed" in (tmp_path / "uninterrupted" / "model.safetensors.index.json").read_text()


def test_fp8_run_killed_at_every_step_then_resumed_is_identical(prune_args, worker, tmp_path):
    """An FP8 checkpoint written back as FP8: each weight and its fresh scales (tensors the layout adds) resume
    to the same bytes from every third step and each of the last twelve."""
    import torch
    from test_fp8 import to_fp8

    from offload_prune.demo import make_checkpoint
    model = to_fp8(make_checkpoint(tmp_path / "fp8-model", num_layers=3, hidden=64, intermediate=128,
                                   max_shard_size="40KB", dtype=torch.bfloat16), block=32)
    args = lambda save: prune_args(model, save)  # noqa: E731
    swept_identical(worker, args, tmp_path, "fp8", every(3))
    assert ".weight_scale_inv" in (tmp_path / "uninterrupted" / "model.safetensors.index.json").read_text()


def test_double_kill_then_resume_is_identical(resume_model, prune_args, worker, uninterrupted, tmp_path):
    steps = worker.steps(*prune_args(resume_model, tmp_path / "logged"))
    failures = []
    for k in range(1, len(steps) + 1, 2):
        save = tmp_path / f"k{k}"
        second = 1 + (k * 37) % len(steps)  # the resumed run is killed at its own step `second`
        problem = kill_then_resume(worker, prune_args(resume_model, save), k, second_kill=second)
        if problem is None and folder_digests(save) != uninterrupted:
            problem = "output differs from the uninterrupted run"
        if problem:
            failures.append(f"steps {k} then {second}: {problem}")
    assert not failures, "\n".join(failures)


def test_ctrl_c_stops_at_a_resumable_point(resume_model, prune_args, worker, uninterrupted, tmp_path):
    save = tmp_path / "out"
    code, printed = worker.run(*prune_args(resume_model, save),
                               env={"OFFLOAD_PRUNE_KILL_AT_STEP": "rename:acts_00002.bin",
                                    "OFFLOAD_PRUNE_KILL_SIGNAL": "INT"})
    assert code == 130
    assert "resume" in printed and "Traceback" not in printed
    code, printed = worker.run(*prune_args(resume_model, save, "--resume"))
    assert code == 0, printed
    assert folder_digests(save) == uninterrupted


def kill_after_block(worker, args, block):
    """Killed right after block `block` committed (its input activations are then deleted)."""
    code, printed = worker.run(*args, env={"OFFLOAD_PRUNE_KILL_AT_STEP": f"delete:acts_{block:05d}.bin"})
    assert code == -9, printed


def test_resume_with_other_options_is_refused(resume_model, prune_args, worker, tmp_path):
    save = tmp_path / "out"
    kill_after_block(worker, prune_args(resume_model, save), 0)
    code, printed = worker.run(*prune_args(resume_model, save, "--sparsity_ratio", "0.6"))
    assert code == 2
    assert "an unfinished run of a different job (options.sparsity_ratio: 0.5 then, 0.6 now)" in printed
    assert len(printed.strip().splitlines()) == 1


def test_same_job_in_other_spellings_resumes(resume_model, worker, uninterrupted, calibration_text, tmp_path):
    """Relative vs absolute paths, a copy of the model and text elsewhere, --device/--dtype auto vs
    what they resolve to on this machine: the same job."""
    import shutil
    work = tmp_path / "work"
    shutil.copytree(resume_model, work / "model")
    (tmp_path / "text.txt").write_bytes(calibration_text.read_bytes())
    (work / "calibration.txt").write_bytes(calibration_text.read_bytes())
    relative = ["--model", "model", "--save", "out", "--prune_method", "wanda", "--calib-data", "calibration.txt",
                "--nsamples", 4, "--seqlen", 32, "--device", "auto", "--dtype", "auto"]
    code, printed = worker.run(*relative, env={"OFFLOAD_PRUNE_KILL_AT_STEP": "rename:acts_00001.bin"}, cwd=work)
    assert code == -9, printed
    code, printed = worker.run("--model", resume_model, "--save", work / "out", "--prune_method", "wanda",
                               "--calib-data", tmp_path / "text.txt", "--nsamples", 4, "--seqlen", 32,
                               "--device", "cpu", "--dtype", "float32", "--quiet")
    assert code == 0, printed
    assert folder_digests(work / "out") == uninterrupted
    manifest = json.loads((work / "out" / ".offload-prune-run" / "manifest.json").read_text())
    assert set(manifest["fingerprint"]["versions"]) == {"offload_prune", "torch", "transformers"}
    assert str(resume_model) not in json.dumps(manifest["fingerprint"])


def test_what_changes_the_result_is_refused(resume_model, prune_args, worker, tmp_path):
    save = tmp_path / "out"
    kill_after_block(worker, prune_args(resume_model, save), 0)
    manifest_path = save / ".offload-prune-run" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["fingerprint"]["versions"]["transformers"] = "4.0.0"
    manifest_path.write_text(json.dumps(manifest))
    code, printed = worker.run(*prune_args(resume_model, save))
    assert code == 2 and "versions.transformers: 4.0.0 then" in printed
    code, printed = worker.run(*prune_args(resume_model, save, "--prune_method", "magnitude"))
    assert code == 2 and "options.prune_method: wanda then, magnitude now" in printed


def test_finished_run_repeated_is_complete(resume_model, prune_args, worker, uninterrupted, tmp_path):
    save = tmp_path / "out"
    assert worker.run(*prune_args(resume_model, save))[0] == 0
    times = {p.name: p.stat().st_mtime_ns for p in save.iterdir()}
    args = [a for a in prune_args(resume_model, save) if a != "--quiet"]
    code, printed = worker.run(*args)
    assert code == 0 and "already holds the finished output of this job" in printed
    assert {p.name: p.stat().st_mtime_ns for p in save.iterdir()} == times
    code, printed = worker.run(*prune_args(resume_model, save, "--resume"))
    assert code == 0
    code, printed = worker.run(*prune_args(resume_model, save, "--seed", "1"))
    assert code == 2 and "the finished output of a different job" in printed and "--overwrite" in printed
    assert folder_digests(save) == uninterrupted


@pytest.mark.parametrize("damage, redone", [
    ("truncate acts", "redoing from the calibration capture and block 0"),
    ("flip acts", "redoing from the calibration capture and block 0"),
    ("delete kwargs", "redoing from the calibration capture and block 0"),
    ("truncate block 0 shard", "redoing from the calibration capture and block 0"),
    ("delete block 1 shard", "redoing from the calibration capture and block 0"),
])
def test_damaged_run_file_is_redone_from_the_last_intact_state(resume_model, prune_args, worker, uninterrupted, tmp_path,
                                                               damage, redone):
    save = tmp_path / "out"
    kill_after_block(worker, prune_args(resume_model, save), 1)
    run_dir = save / ".offload-prune-run"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    shards = {record["stage"]: name for name, record in sorted(manifest["outputs"].items(), reverse=True)}
    target = {"acts": run_dir / "acts_00002.bin", "kwargs": run_dir / "layer_kwargs.pt",
              "block 0 shard": save / shards[0], "block 1 shard": save / shards[1]}[damage.split(" ", 1)[1]]
    action = damage.split()[0]
    if action == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif action == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 1
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    code, printed = worker.run(*prune_args(resume_model, save))
    assert code == 0, printed
    notice = [line for line in printed.splitlines() if "damaged" in line]
    assert len(notice) == 1 and target.name in notice[0] and redone in notice[0] and "safe" in notice[0]
    assert folder_digests(save) == uninterrupted


def test_damaged_finished_output_is_repaired(resume_model, prune_args, worker, uninterrupted, tmp_path):
    save = tmp_path / "out"
    assert worker.run(*prune_args(resume_model, save))[0] == 0
    (save / "config.json").write_text("{}")
    code, printed = worker.run(*prune_args(resume_model, save))
    assert code == 0, printed
    assert "config.json is damaged" in printed and "all blocks are intact" in printed
    assert folder_digests(save) == uninterrupted


def test_file_size_limit_then_resume(resume_model, prune_args, worker, uninterrupted, tmp_path):
    """ulimit -f below the size of an activation file: one clear line, and the same command without
    the limit resumes to the same output."""
    save = tmp_path / "out"
    code, printed = worker.run(*prune_args(resume_model, save), fsize_limit=20_000)
    assert code == 2, printed
    line = printed.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "file-size limit" in line and "needs about" in line and "run the same command again" in line
    assert not list(save.rglob("*.tmp"))
    code, printed = worker.run(*prune_args(resume_model, save))
    assert code == 0, printed
    assert folder_digests(save) == uninterrupted


def test_checksums_summed_from_memory_equal_the_files_read_back(tmp_path):
    """Shards and activation files record a CRC-32 computed from the bytes in memory, not by reading the
    written file back: it must be the CRC of the file, or a resume would redo every block."""
    import torch

    from offload_prune.disk import durable
    from offload_prune.disk.checkpoint import save_shard

    torch.manual_seed(0)
    tensors = {"layers.1.weight": torch.randn(7, 5, dtype=torch.bfloat16), "embed": torch.randn(10, 4)[3:],
               "bias": torch.randn(3, dtype=torch.float16), "scale": torch.tensor(2.5, dtype=torch.float16),
               "ids": torch.arange(9), "flags": torch.rand(6) > 0.5, "empty": torch.zeros(0, 4)}
    assert tensors["embed"].storage_offset() == 12  # a view into a larger storage: only its own bytes count
    crc = save_shard(tensors, tmp_path / "direct.safetensors")
    assert crc is not None and crc == durable.checksum(tmp_path / "direct.safetensors").crc32
    record = durable.write_file(tmp_path / "shard.safetensors", lambda tmp: save_shard(tensors, tmp))
    assert record == durable.checksum(tmp_path / "shard.safetensors")
    activations = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    record = durable.write_bytes(tmp_path / "acts.bin", durable.tensor_bytes(activations))
    assert record == durable.checksum(tmp_path / "acts.bin") and record.size == activations.numel() * 2


def _direct_io_or_skip(folder) -> None:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this OS")
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        pytest.skip(f"{folder}'s filesystem refuses O_DIRECT")


def _refuse(error: int):
    def write(*args):
        raise OSError(error, os.strerror(error))
    return write


@pytest.mark.parametrize("path", ["around the cache", "no O_DIRECT", "O_DIRECT refused"])
def test_shards_written_directly_read_back_as_safetensors_wrote_them(tmp_path, monkeypatch, path):
    """save_shard writes the safetensors format itself (no intermediate copy): safetensors reads every
    tensor back equal, with the metadata transformers looks for; the data starts 8-byte aligned and
    each tensor at a multiple of its element size; the layout is the one safetensors writes. So it
    does around the page cache (O_DIRECT, through a staging buffer made small here, so that tensors
    straddle its fills and the last one is padded and cut), where the OS has no O_DIRECT, and where
    the filesystem refuses it at the first write (written again through the cache)."""
    import struct

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from offload_prune.disk import durable
    from offload_prune.disk.checkpoint import save_shard

    monkeypatch.setattr(durable, "DIRECT_STAGING_BYTES", 8192)
    opened = []
    if path == "around the cache":
        _direct_io_or_skip(tmp_path)
        real_open = os.open
        monkeypatch.setattr(os, "open", lambda file, flags, *rest: opened.append(flags) or real_open(file, flags, *rest))
    elif path == "no O_DIRECT":
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    else:
        monkeypatch.setattr(os, "write", _refuse(errno.EINVAL))
    torch.manual_seed(0)
    tensors = {"odd.bf16": torch.randn(7, 5, dtype=torch.bfloat16), "embed": torch.randn(10, 4)[3:],
               "half": torch.randn(3, dtype=torch.float16), "scale": torch.tensor(2.5, dtype=torch.float64),
               "ids": torch.arange(9, dtype=torch.int32), "flags": torch.rand(5) > 0.5, "empty": torch.zeros(0, 4),
               "fp8": torch.randn(3, 3).to(torch.float8_e4m3fn), "columns": torch.randn(4, 6).t(),
               "wide": torch.randn(3001), "wider.half": torch.randn(70, 90, dtype=torch.float16)[:, 1:]}
    crc = save_shard(tensors, tmp_path / "mine.safetensors")
    if path == "around the cache":
        assert any(flags & os.O_DIRECT for flags in opened)
    assert crc == durable.checksum(tmp_path / "mine.safetensors").crc32
    loaded = load_file(tmp_path / "mine.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    with safe_open(tmp_path / "mine.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    raw = (tmp_path / "mine.safetensors").read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    assert (8 + size) % 8 == 0
    assert all(entry["data_offsets"][0] % tensors[name].element_size() == 0
               for name, entry in header.items() if name != "__metadata__")
    # The same layout as safetensors' own writer (widest elements first, then by name), so the same bytes.
    save_file({n: t.contiguous() for n, t in tensors.items()}, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    theirs = (tmp_path / "theirs.safetensors").read_bytes()
    assert raw == theirs


def test_a_full_disk_under_direct_writes_is_reported_not_written_through_the_cache(tmp_path, monkeypatch):
    """Only a refusal of O_DIRECT itself falls back to buffered writes; no space left is the one-line
    disk-full error, with no temporary file left behind."""
    import torch

    from offload_prune.disk import durable
    from offload_prune.disk.checkpoint import save_shard

    _direct_io_or_skip(tmp_path)
    monkeypatch.setattr(os, "write", _refuse(errno.ENOSPC))
    with pytest.raises(durable.DiskFullError, match="no space left"):
        durable.write_file(tmp_path / "shard.safetensors", lambda tmp: save_shard({"w": torch.ones(5000)}, tmp))
    assert not list(tmp_path.glob("shard*"))


@pytest.mark.parametrize("first", ["device", "ram"])
def test_device_store_resumes_identically(resume_model, prune_args, worker, uninterrupted, tmp_path, first):
    """The device store (the compute device is the CPU here) persists and reopens through a host staging
    buffer. Killed once block 2's inputs were persisted, by a run keeping them on the device or in RAM (the
    files are the same), and resumed on the device: the uninterrupted RAM run's files."""
    save = tmp_path / "out"
    code, printed = worker.run(*prune_args(resume_model, save, "--offload-activations", first),
                               env={"OFFLOAD_PRUNE_KILL_AT_STEP": "rename:acts_00002.bin"})
    assert code == -9, printed
    assert json.loads((save / ".offload-prune-run" / "manifest.json").read_text())["completed_blocks"] == 1
    code, printed = worker.run(*prune_args(resume_model, save, "--offload-activations", "device"))
    assert code == 0, printed
    assert folder_digests(save) == uninterrupted


def test_device_store_persists_and_reopens_through_a_small_staging_buffer(tmp_path, monkeypatch):
    import torch

    from offload_prune.runtime import activations
    from offload_prune.disk import durable

    monkeypatch.setattr(activations, "STAGING_BYTES", 1000)  # 3 x 7 x 24 bf16 = 1008 bytes: a full piece, 8 left
    store = activations.ActivationStore(tmp_path, (3, 7, 24), torch.bfloat16, "device")
    expected = torch.randn(3, 7, 24).to(torch.bfloat16)
    store.create(0).copy_(expected)
    record = store.commit(1)
    assert store.path(1).read_bytes() == bytes(durable.tensor_bytes(expected))
    assert record == durable.checksum(store.path(1))
    assert torch.equal(activations.ActivationStore(tmp_path, (3, 7, 24), torch.bfloat16, "device").open(1), expected)


def test_disk_activations_summed_as_written_are_not_read_back(tmp_path, monkeypatch):
    """On disk the outputs go through a memory map; the micro-batches' bytes are summed as run_windows
    fills them, in order, so persisting does not read the file back (a second disk read of it when it
    is larger than the page cache). Rows filled out of order, or not all, are read back instead."""
    import torch

    from offload_prune.runtime import activations
    from offload_prune.disk import durable
    from offload_prune.model.skeleton import run_windows

    reads = []
    checksum = durable.checksum
    monkeypatch.setattr(durable, "checksum", lambda path: reads.append(path.name) or checksum(path))
    inputs = torch.randn(5, 3, 4).to(torch.bfloat16)
    store = activations.ActivationStore(tmp_path, inputs.shape, torch.bfloat16, "disk")
    run_windows(lambda x: x * 3, {}, inputs, store.output_buffer(1), 2, torch.device("cpu"), store.written)
    record = store.advance()(1)
    assert reads == [] and record == checksum(store.path(1))
    assert torch.equal(store.open(1), inputs * 3)

    out = store.output_buffer(2)  # the same rows, out of order: the file is read back for its CRC
    for rows in (slice(2, 5), slice(0, 2)):
        out[rows] = inputs[rows] * 5
        store.written(rows)
    record = store.advance()(2)
    assert reads == [store.name(2) + durable.TMP_SUFFIX] and record == checksum(store.path(2))
