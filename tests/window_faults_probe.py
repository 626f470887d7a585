"""Run by test_memory.py in a fresh process (a long-lived one has holes in its heaps that hide the effect):
the page faults of running 4 and of 64 windows through one Llama block on the CPU, printed as JSON."""
import json
import resource

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from offload_prune.model.skeleton import run_windows
from offload_prune.runtime.hostmem import keep_large_allocations_mmapped


def main() -> None:
    if not keep_large_allocations_mmapped():
        print(json.dumps(None))  # not glibc
        return
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=4,
                         num_hidden_layers=1, attn_implementation="sdpa")
    layer, positions = LlamaDecoderLayer(config, 0).eval(), torch.arange(256)[None]
    kwargs = {"position_embeddings": LlamaRotaryEmbedding(config)(torch.zeros(1), positions),
              "position_ids": positions, "attention_mask": None}

    def faults(windows: int) -> int:
        hidden = torch.randn(windows, 256, 256)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run_windows(layer, kwargs, hidden, hidden, 1, torch.device("cpu"))
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults(2)  # warm
    print(json.dumps({"4": faults(4), "64": faults(64)}))


if __name__ == "__main__":
    main()
