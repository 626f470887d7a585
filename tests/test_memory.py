"""Host memory is set by one block, not by the model: 8x the layers, about the same peak RSS."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from offload_prune.demo import make_checkpoint

from conftest import run_cli

WIDTH = dict(hidden=512, intermediate=1376, heads=8, kv_heads=8, max_shard_size="50MB")


def peak_rss_and_size(folder, tmp_path):
    save = tmp_path / f"out-{folder.name}"
    result = run_cli("--model", folder, "--save", save, "--calib-data", folder / "demo.txt",
                     "--nsamples", 4, "--seqlen", 64, "--quiet")
    assert result.returncode == 0, result.stderr
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return json.loads((save / "report.json").read_text())["peak_host_rss_bytes"], size


def test_peak_rss_does_not_grow_with_layers(tmp_path):
    shallow = make_checkpoint(tmp_path / "l4", num_layers=4, **WIDTH)
    deep = make_checkpoint(tmp_path / "l32", num_layers=32, **WIDTH)
    rss4, size4 = peak_rss_and_size(shallow, tmp_path)
    rss32, size32 = peak_rss_and_size(deep, tmp_path)
    block_bytes = (size32 - size4) / 28
    growth = rss32 - rss4
    print(f"peak RSS {rss4 / 2**20:.0f} MiB (4 layers, {size4 / 2**20:.0f} MiB) -> "
          f"{rss32 / 2**20:.0f} MiB (32 layers, {size32 / 2**20:.0f} MiB); one block {block_bytes / 2**20:.1f} MiB")
    # Loading the whole model would add the 28 extra blocks (~340 MiB); streaming adds at most a few blocks' worth.
    assert growth < 3 * block_bytes




def test_windows_through_a_block_fault_in_its_temporaries_once_not_per_window():
    """While windows run through a block on the CPU, the temporaries of one window's forward are reused by
    the next: glibc neither maps them afresh (the mmap threshold) nor hands their pages back when they are
    freed at the top of a heap (the trim threshold; each thread has its own heap). So the page faults of a
    run stay those of one window's working set however many windows run (before: 4.5-10x more for 64
    windows than for 4)."""
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("window_faults_probe.py"))],
                          capture_output=True, text=True, check=True)
    faults = json.loads(done.stdout.strip().splitlines()[-1])
    if faults is None:
        pytest.skip("glibc's mallopt is not available here")
    print(f"page faults: {faults['4']} for 4 windows, {faults['64']} for 64")
    assert faults["64"] < 2 * faults["4"]


def test_a_run_leaves_what_the_process_froze_frozen_and_freezes_nothing_for_good(tiny_llama, tmp_path):
    """The run keeps torch's and transformers' objects out of the collector's sight while it runs; afterwards
    the process's frozen set is what it was: none, or what the process froze itself (not handed back)."""
    import gc

    import offload_prune
    from conftest import quick_args
    args = quick_args(tiny_llama, tmp_path / "a")
    options = dict(calib_data=args[args.index("--calib-data") + 1], nsamples=4, seqlen=32, quiet=True)
    gc.unfreeze()
    offload_prune.prune(tiny_llama, tmp_path / "a", **options)
    assert gc.get_freeze_count() == 0
    gc.freeze()
    frozen = gc.get_freeze_count()
    try:
        offload_prune.prune(tiny_llama, tmp_path / "b", **options)
        assert frozen - 100 <= gc.get_freeze_count() <= frozen  # still frozen (reference counting frees a few)
    finally:
        gc.unfreeze()
