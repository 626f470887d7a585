"""A guard on speed that does not time the whole run: within one process, the prune phase's time outside
the block forwards and the method's solve (loading, committing, bookkeeping) stays a small fraction."""
import time

import pytest

import offload_prune
import offload_prune.stream.blocks as blocks
import offload_prune.stream.passes as passes
from offload_prune.methods.admm import ADMM
from offload_prune.methods.sparsegpt import SparseGPT
from offload_prune.methods.wanda import Wanda

#: Measured 2.5-7 % on a 4-block width-256 Llama with 16-64 windows of 256 tokens (2-core CPU).
OVERHEAD_LIMIT = 0.20


def test_per_block_overhead_is_a_small_fraction_of_the_prune_phase(checkpoint_factory, tmp_path, monkeypatch):
    model = checkpoint_factory(num_layers=4, hidden=256, intermediate=688, heads=4, kv_heads=4)
    spent = {"forward": 0.0, "solve": 0.0}

    def timed(key, function):
        def measured(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start
        return measured

    monkeypatch.setattr(blocks, "run_windows", timed("forward", blocks.run_windows))
    monkeypatch.setattr(passes, "run_windows", timed("forward", passes.run_windows))
    monkeypatch.setattr(Wanda, "prune", timed("solve", Wanda.prune))
    report = offload_prune.prune(model, tmp_path / "o", calib_data=str(model / "demo.txt"), nsamples=32, seqlen=256,
                                 quiet=True)
    phase = report["seconds"]["prune"]
    overhead = phase - spent["forward"] - spent["solve"]
    print(f"prune phase {phase:.2f} s: forwards {spent['forward']:.2f} s, solve {spent['solve']:.2f} s, "
          f"the rest {overhead / phase:.1%}")
    assert spent["forward"] > 0 and spent["solve"] > 0
    assert overhead / phase < OVERHEAD_LIMIT


@pytest.mark.parametrize("method_class,method", [(Wanda, "wanda"), (SparseGPT, "sparsegpt"), (ADMM, "admm")])
def test_a_statistics_pass_that_reads_inputs_only_stops_before_the_last_matrix(checkpoint_factory, tmp_path,
                                                                                monkeypatch, method_class, method):
    """Wanda, SparseGPT and ADMM read the matrices' inputs alone (the Hessian gives the output energy an
    error is reported against): their pass stops each forward when down_proj's input arrives (down_proj,
    the residual add and the rest are not computed), and the weights are bit for bit those of whole
    forwards."""
    import torch

    from offload_prune.methods.base import PruningMethod
    from conftest import folder_digests, read_all_tensors
    model = checkpoint_factory(num_layers=3, hidden=64, intermediate=128)
    calls = {"down_proj": 0}
    original = torch.nn.Linear.forward

    def counted(self, x):
        if getattr(self, "out_features", None) == 64 and getattr(self, "in_features", None) == 128:
            calls["down_proj"] += 1
        return original(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counted)
    options = dict(prune_method=method, calib_data=str(model / "demo.txt"), nsamples=4, seqlen=32, quiet=True,
                   overlap_io=False)
    offload_prune.prune(model, tmp_path / "stopped", **options)
    stopped = calls["down_proj"]
    monkeypatch.setattr(method_class, "reads_outputs", PruningMethod.reads_outputs)  # whole forwards, as before
    calls["down_proj"] = 0
    offload_prune.prune(model, tmp_path / "whole", **options)
    assert calls["down_proj"] - stopped == 3 * 4  # every block's statistics pass, 4 windows each
    assert read_all_tensors(tmp_path / "stopped").keys() == read_all_tensors(tmp_path / "whole").keys()
    assert folder_digests(tmp_path / "stopped") == folder_digests(tmp_path / "whole")
