"""Run by test_plan.py in a fresh process: SparseGPT, ADMM or structured FLAP (whole neurons, the down
projection refitted) on one Llama block (Hessians summed in the given dtype), printing the statistics bytes held after the statistics pass
(Hessians, or the moments of down_proj's input) and the peak resident memory of the prune steps (VmHWM
reset through /proc/self/clear_refs; large tensors are mmapped, so freed ones leave RSS), next to the plan."""
import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from offload_prune.config import PruneConfig
from offload_prune.runtime.hostmem import keep_large_allocations_mmapped
from offload_prune.methods import build_method
from offload_prune.model.matrices import describe, find_matrices
from offload_prune.stream.passes import collect


def status():
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def main(method_name: str, true_sequential: bool, hessian_dtype: str) -> None:
    keep_large_allocations_mmapped()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=4)
    block = LlamaDecoderLayer(config, 0).eval()
    linears = find_matrices(block)
    describe(block, linears)
    # Two ADMM iterations: the memory does not depend on how many.
    structured = method_name.endswith("-structured")
    options = PruneConfig(model="-", prune_method=method_name.removesuffix("-structured"), seqlen=64, micro_batch_size=1,
                          true_sequential=true_sequential, hessian_dtype=hessian_dtype, admm_iterations=2,
                          **(dict(sparsity_type="structured", sparsity_ratio=0.25) if structured else {})).validate()
    x = torch.randn(4, 64, 2048)
    positions = torch.arange(64)[None]
    kwargs = {"position_embeddings": LlamaRotaryEmbedding(config)(x, positions), "position_ids": positions,
              "attention_mask": None}
    cpu = torch.device("cpu")
    warm_up = build_method(options)  # the first LAPACK calls allocate one-time buffers
    if structured:
        spare = LlamaDecoderLayer(config, 0).eval()
        spare_linears = find_matrices(spare)
        describe(spare, spare_linears)
        mlp = {n: m for n, m in spare_linears.items() if n.startswith("mlp.")}
        warm_up.groups(mlp)
        collect(warm_up, spare, mlp, kwargs, x, options, cpu)
        with torch.no_grad():
            warm_up.prune(mlp, options.sparsity_ratio)
    else:
        collect(warm_up, block, {"mlp.down_proj": linears["mlp.down_proj"]}, kwargs, x, options, cpu)
        with torch.no_grad():
            warm_up.prune({"mlp.down_proj": torch.nn.Linear(4096, 2048)}, options.sparsity_ratio)

    method = build_method(options)
    if structured:
        linears = {n: m for n, m in linears.items() if n.startswith("mlp.")}
    planned = method.memory_bytes(linears, torch.float32, "cpu")
    held, peak = 0, 0
    for group in method.groups(linears):
        collect(method, block, {n: linears[n] for n in group}, kwargs, x, options, cpu)
        statistics = (sum(m.gram.nbytes + m.sums.nbytes + m.squares.nbytes + m.shift.nbytes for m in method.moments.values())
                      if structured else sum(h.nbytes for h in method.hessians.values()))
        held = max(held, statistics)
        before, _ = status()
        Path("/proc/self/clear_refs").write_text("5")
        with torch.no_grad():
            method.prune({n: linears[n] for n in group}, options.sparsity_ratio)
        peak = max(peak, status()[1] - before + statistics)
    print(json.dumps({"held": held, "peak": peak, "planned_statistics": planned["statistics"],
                      "planned_prune": planned["prune"]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "True", sys.argv[3])
