"""llm-compressor's `oneshot` on token windows given to it, for bench/peer.py. Runs in the peer's own venv
(it imports nothing of offload-prune): prints one JSON line with the time `oneshot` took."""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True, help="a torch file of int64 token windows [n, seqlen]")
    parser.add_argument("--method", choices=("wanda", "sparsegpt"), required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--structure", default="0:0", help="llm-compressor's mask_structure: 0:0 unstructured, 2:4")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = torch.load(args.windows)
    calibration = Dataset.from_dict({"input_ids": windows.tolist(),
                                     "attention_mask": torch.ones_like(windows).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[args.method]
    # The head stays dense, as offload-prune leaves it (with tied embeddings, pruning it would prune them too):
    # llm-compressor prunes it unless told, by this pattern (its own warning's advice).
    recipe = modifier(sparsity=args.sparsity, mask_structure=args.structure, ignore=["re:.*lm_head"])
    start = time.perf_counter()
    oneshot(model=model, dataset=calibration, recipe=recipe, num_calibration_samples=len(windows),
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(args.out)
    print(json.dumps({"core_seconds": seconds}))


if __name__ == "__main__":
    main()
