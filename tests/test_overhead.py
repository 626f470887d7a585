"""A guard on speed that does not time the whole run: within one process, the prune phase's time outside
the block forwards and the method's solve (loading, committing, bookkeeping) stays a small fraction."""
import time

import offload_prune
import offload_prune.stream.blocks as blocks
import offload_prune.stream.passes as passes
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
