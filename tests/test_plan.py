"""The memory plan against what a run actually allocates, and the refusal it enables."""
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from offload_prune.checkpoint import CheckpointReader
from offload_prune.cli import main
from offload_prune.config import PruneConfig
from offload_prune.hostmem import keep_large_allocations_mmapped
from offload_prune.methods.sparsegpt import SparseGPT
from offload_prune.pipeline import _collect, find_linears
from offload_prune.plan import memory_plan
from offload_prune.skeleton import StreamedModel

from conftest import run_cli

GIB = 2**30


def test_block_weights_and_activation_cache_match_the_plan(tiny_llama, tmp_path):
    reader = CheckpointReader(str(tiny_llama))
    config = PruneConfig(model=str(tiny_llama), nsamples=4, seqlen=32, prune_method="wanda").validate()
    plan = memory_plan(config, reader.config, "cpu")
    block = StreamedModel(reader, torch.device("cpu"), torch.float32).load_block(0)
    assert plan["device"]["block_weights"] == sum(p.nbytes for p in block.parameters())
    save = tmp_path / "out"
    killed = run_cli("--model", tiny_llama, "--save", save, "--calib-data", tiny_llama / "demo.txt", "--nsamples", 4,
                     "--seqlen", 32, "--quiet", env_extra={"OFFLOAD_PRUNE_KILL_AT": "block-start:0"})
    assert killed.returncode == -9
    cache_file = save / ".offload-prune-run" / "acts_00000.bin"
    assert cache_file.stat().st_size == plan["activation_cache_bytes"] == plan["host"]["activation_cache"]


def _status():
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset peak RSS")
@pytest.mark.parametrize("true_sequential", [False, True])
def test_sparsegpt_statistics_and_prune_peak_match_the_plan(true_sequential):
    """Statistics held are exact; the prune step's peak, measured as resident memory (VmHWM reset
    through /proc/self/clear_refs; large tensors are mmapped, so freed ones leave RSS), is within 15%."""
    keep_large_allocations_mmapped()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=4)
    block = LlamaDecoderLayer(config, 0).eval()
    linears = find_linears(block)
    options = PruneConfig(model="-", prune_method="sparsegpt", seqlen=64, true_sequential=true_sequential).validate()
    x = torch.randn(4, 64, 2048)
    positions = torch.arange(64)[None]
    kwargs = {"position_embeddings": LlamaRotaryEmbedding(config)(x, positions), "position_ids": positions,
              "attention_mask": None}
    warm_up = SparseGPT(options)  # first LAPACK calls allocate one-time buffers
    _collect(warm_up, block, {"mlp.down_proj": linears["mlp.down_proj"]}, kwargs, x, options, torch.device("cpu"))
    warm_up.prune({"mlp.down_proj": torch.nn.Linear(4096, 2048)})

    method = SparseGPT(options)
    planned = method.memory_bytes(linears, torch.float32)
    held, peak = 0, 0
    for group in method.groups(linears):
        _collect(method, block, {n: linears[n] for n in group}, kwargs, x, options, torch.device("cpu"))
        statistics = sum(h.nbytes for h in method.hessians.values())
        held = max(held, statistics)
        before, _ = _status()
        Path("/proc/self/clear_refs").write_text("5")
        with torch.no_grad():
            method.prune({n: linears[n] for n in group})
        peak = max(peak, _status()[1] - before + statistics)
    print(f"prune peak measured {peak / 2**20:.1f} MiB, planned {planned['prune'] / 2**20:.1f} MiB")
    assert held == planned["statistics"]
    assert peak == pytest.approx(planned["prune"], rel=0.15)


def test_over_budget_is_refused_before_any_weight_is_read(tiny_llama, tmp_path, capsys, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read")
    monkeypatch.setattr(CheckpointReader, "read", no_reads)
    for flag, where in (("--max-device-memory", "device"), ("--max-host-memory", "host")):
        code = main(["--model", str(tiny_llama), "--save", str(tmp_path / "o"), "--prune_method", "sparsegpt",
                     "--calib-data", str(tiny_llama / "demo.txt"), flag, "1MiB", "--quiet"])
        assert code == 2
        assert f"over --max-{where}-memory 0.00 GiB" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()


def test_plan_for_llama2_70b_on_a_24gb_gpu(tmp_path, capsys):
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000, dtype="float16").save_pretrained(tmp_path)
    config = PruneConfig(model=str(tmp_path), prune_method="sparsegpt").validate()
    plan = memory_plan(config, LlamaConfig.from_pretrained(tmp_path), "cuda")
    down_hessian = 28672**2 * 4
    assert plan["method"]["statistics"] == down_hessian + 3 * 8192**2 * 4
    assert plan["device"]["peak"] <= 12 * GIB
    assert plan["host"]["peak"] <= 16 * GIB
    disk = memory_plan(PruneConfig(model="-", prune_method="sparsegpt", offload_activations="disk").validate(),
                       LlamaConfig.from_pretrained(tmp_path), "cuda")
    assert disk["host"]["peak"] <= 6 * GIB
    assert main(["plan", "--model", str(tmp_path), "--prune_method", "sparsegpt", "--device", "cuda"]) == 0
    assert "device peak" in capsys.readouterr().out
    assert main(["plan", "--model", str(tmp_path), "--prune_method", "sparsegpt", "--device", "cuda",
                 "--max-device-memory", "8GiB"]) == 2
