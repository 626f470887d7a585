"""Command line: `offload-prune [prune] --model ... --prune_method wanda ...` and `offload-prune eval ...`.

Flags keep the spellings of the SparseGPT / Wanda / NeuronRank scripts (`--prune_method`,
`--sparsity_ratio`); each also answers to the other separator (`--sparsity-ratio`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .basics import OffloadPruneError, parse_bytes
from .config import (ACTIVATION_STORES, DTYPES, HESSIAN_DTYPES, METHODS, OUTPUT_DTYPES, QUANT_METHODS, QUANT_SCHEMES,
                     RECON_OPTIMIZERS, RECON_DTYPES, RECON_TARGETS, RECONSTRUCT_MODES, PruneConfig)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other refusal, instead of usage + error
        raise OffloadPruneError(f"{message} (see {self.prog} --help)")


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    spellings = [f"--{name}"]
    other = name.replace("_", "-") if "_" in name else name.replace("-", "_")
    if other != name:
        spellings.append(f"--{other}")
    parser.add_argument(*spellings, dest=name.replace("-", "_"), **kwargs)


def _micro_batch(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _common(parser: argparse.ArgumentParser, stores: tuple[str, ...] = ("ram", "disk"),
            planned_micro_batch: bool = False) -> None:
    parser.add_argument("--version", action="version", version=f"offload-prune {__version__}")
    _flag(parser, "model", required=True, help="local Hugging Face model folder or hub id")
    _flag(parser, "seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    _flag(parser, "device", default="auto", help="cuda, cuda:N or cpu (default: cuda when available)")
    _flag(parser, "dtype", default="auto", choices=DTYPES,
          help="compute dtype (default: float32 on CPU, the checkpoint's dtype on GPU)")
    if planned_micro_batch:
        _flag(parser, "micro-batch-size", type=_micro_batch, default="auto",
              help="windows per forward call (default auto: 1 on the CPU; on a GPU the most, up to 8192 tokens, "
                   "that the memory plan fits)")
    else:
        _flag(parser, "micro-batch-size", type=int, default=1, help="windows per forward call (default 1)")
    _flag(parser, "offload-activations", default="ram", choices=stores,
          help="keep cached activations in RAM or in a memory-mapped file" + (
              ", or on the compute device (a GPU: no host copies per micro-batch); auto: on the GPU when the "
              "memory plan with them there fits it (--max-device-memory, or 90 %% of its free memory), else in "
              "RAM when it fits the host (--max-host-memory, or the memory available), else on disk"
              if "auto" in stores else ""))
    _flag(parser, "eval-data", default=None, help="text file (or wikitext2) for perplexity")
    _flag(parser, "eval-max-windows", type=int, default=None, help="evaluate at most this many windows")
    _task_flags(parser)
    _flag(parser, "quiet", action="store_true", help="no progress bars or summary")


def _task_flags(parser: argparse.ArgumentParser) -> None:
    """lm-evaluation-harness tasks, scored by the stream (the eval extra); lm-eval's own spellings accepted."""
    parser.add_argument("--eval-tasks", "--eval_tasks", "--tasks", dest="eval_tasks", default=None,
                        help="lm-eval tasks, comma-separated, or default (boolq, rte, hellaswag, winogrande, arc_easy, "
                             "arc_challenge, openbookqa); needs pip install 'offload-prune[eval]'")
    parser.add_argument("--eval-limit", "--limit", dest="eval_limit", type=float, default=None,
                        help="documents per task (below 1: a fraction); for quick checks")
    parser.add_argument("--eval-num-fewshot", "--num-fewshot", "--num_fewshot", dest="eval_num_fewshot", type=int,
                        default=None, help="few-shot examples per prompt (default: each task's own)")
    parser.add_argument("--eval-include-path", "--include-path", "--include_path", dest="eval_include_path",
                        default=None, help="a folder of local task YAMLs, as lm-eval's --include_path")
    _flag(parser, "eval-work-dir", default=None,
          help="where a task evaluation keeps its resumable state and disk cache (default: the temporary folder)")


def prune_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="offload-prune", description=(
        "Prune a Hugging Face causal LM block by block from its safetensors shards. "
        "Other commands: `offload-prune eval --model X --eval-data F` (perplexity), "
        "`offload-prune plan --model X ...` (memory needed, from config.json only)."))
    _common(parser, stores=ACTIVATION_STORES, planned_micro_batch=True)
    _flag(parser, "save", type=Path, default=None, help="output folder for the pruned model (required)")
    _flag(parser, "overlap-io", default="on", choices=("on", "off"),
          help="read the next block and write the last one while a block computes (default on; off: one "
               "block less of host memory each)")
    _flag(parser, "prune_method", default="wanda", choices=METHODS)
    _flag(parser, "sparsity_ratio", type=float, default=0.5, help="fraction of weights to prune (unstructured)")
    _flag(parser, "sparsity_type", default="unstructured",
          help="unstructured, N:M such as 2:4, 4:8, or structured (whole MLP neurons: magnitude, wanda, flap, "
               "neuronrank_old, neuronrank_tfidf)")
    _flag(parser, "shrink", action="store_true",
          help="structured: remove the neurons from the matrices and shrink intermediate_size (default: zero them)")
    _flag(parser, "neuron-refit", default="on", choices=("on", "off"),
          help="structured: refit the MLP output matrix on the kept neurons by least squares (default on)")
    _flag(parser, "prune-heads", type=float, default=0.0,
          help="structured (magnitude, wanda, flap): fraction of each attention layer's key/value groups removed "
               "with their query heads (removed with --shrink, else zeroed; the output projection refitted too)")
    _flag(parser, "calib-data", default="c4", help="text file, folder, jsonl, wikitext2 or c4 (default c4)")
    _flag(parser, "nsamples", type=int, default=128, help="calibration windows (default 128)")
    _flag(parser, "seed", type=int, default=0, help="calibration sampling seed (default 0)")
    _flag(parser, "eval-ppl", action="store_true", help="perplexity of the dense and the pruned model")
    _flag(parser, "resume", action="store_true", help="continue the unfinished run in --save")
    _flag(parser, "overwrite", action="store_true", help="replace the contents of a non-empty --save")
    _neuronrank_flags(parser)
    _sparsegpt_and_budget_flags(parser)
    _reconstruction_flags(parser)
    _quantization_flags(parser)
    return parser


def _quantization_flags(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "quantize", default="off", choices=list(QUANT_SCHEMES),
          help="after the mask, quantize each block's weights to 4 or 8-bit integers (16-bit activations) and "
               "write compressed-tensors' pack-quantized checkpoint, which transformers and vLLM load "
               "(needs the quant extra: pip install 'offload-prune[quant]'); default off")
    _flag(parser, "output-dtype", default="auto", choices=OUTPUT_DTYPES,
          help="an FP8 checkpoint (block scales, as DeepSeek-V3's) is written back as FP8 with fresh block scales "
               "(auto, default) or as bfloat16")
    _flag(parser, "quant-method", default="gptq", choices=QUANT_METHODS,
          help="gptq (default: column by column with error feedback through the layer Hessian) or rtn (round "
               "to nearest)")
    _flag(parser, "quant-group-size", type=int, default=128,
          help="input columns sharing one scale (default 128); -1: one scale per output channel")
    _flag(parser, "quant-asym", action="store_true", help="asymmetric: a zero point per group (default symmetric)")
    _flag(parser, "quant-act-order", default=None, choices=("on", "off"),
          help="GPTQ quantizes columns by decreasing Hessian diagonal (activation order; scales stay per group): "
               "on by default with GPTQ, where it measured better")
    _flag(parser, "quant-joint", action="store_true",
          help="with --prune_method sparsegpt: prune and quantize in SparseGPT's one sweep over the columns, "
               "instead of GPTQ after the mask")


def _reconstruction_flags(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "reconstruct", default="off", choices=RECONSTRUCT_MODES,
          help="after the mask, train each block's kept weights to match its dense output: the whole block at "
               "once (block), or its attention and its MLP one after the other (sublayer: less memory); "
               "default off")
    _flag(parser, "recon-target", default="dense-stream", choices=RECON_TARGETS,
          help="what the reconstruction matches: the dense model's own hidden states, carried in a second "
               "activation cache (dense-stream, default), or the dense block on the same inputs (dense-block)")
    _flag(parser, "recon-steps", type=int, default=64, help="optimiser steps per block or sub-layer (default 64)")
    _flag(parser, "recon-batch", type=int, default=1, help="calibration windows per step (default 1)")
    _flag(parser, "recon-lr", type=float, default=1e-3,
          help="learning rate, on a cosine to zero over the steps (default 1e-3)")
    _flag(parser, "recon-optimizer", default="adam", choices=RECON_OPTIMIZERS,
          help="adam (default) or sgd with momentum 0.9")
    _flag(parser, "recon-norms", action="store_true", help="also train biases and norm weights")
    _flag(parser, "recon-dtype", default="auto", choices=RECON_DTYPES,
          help="the training steps' products: bfloat16 (masters, optimiser and loss stay float32) or float32; "
               "default auto: bfloat16 where the GPU or CPU has it in hardware")


def _neuronrank_flags(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "nr-tfidf-mode", default="topic", choices=("doc", "topic"),
          help="TF-IDF++ documents: calibration windows or k-means topics of tokens (default topic)")
    _flag(parser, "nr-tfidf-k", type=int, default=64, help="topics for --nr-tfidf-mode topic (default 64)")
    _flag(parser, "nr-q-active", type=float, default=0.40,
          help="quantile of activation strength that counts as active (default 0.4; the seeds used 0.6)")
    _flag(parser, "nr-spikiness-exp", type=float, default=0.0, help="exponent of max/mean activation (default 0)")
    _flag(parser, "weight-exp", type=float, default=1.0, help="alpha: exponent of |W|")
    _flag(parser, "tf-exp", type=float, default=1.0, help="beta: exponent of TF")
    _flag(parser, "idf-exp", type=float, default=1.0, help="gamma: exponent of IDF")
    _flag(parser, "nr-score", default="input", choices=("input", "neuron"),
          help="neuronrank_tfidf: |W| x ||X_j|| x IDF_j^gamma per output row (input, default) or the seeds' "
               "neuron score with one threshold per module (neuron)")
    _flag(parser, "nr-input-idf-exp", type=float, default=-0.25,
          help="gamma of --nr-score input (default -0.25, the best of the README's sweep; 0 is Wanda)")
    _flag(parser, "nr-mlp-signal", default="down_input", choices=("down_input", "gate"),
          help="MLP neuron activation: down_proj's input (what the neuron emits) or gate_proj's output (the seeds')")
    attention = parser.add_mutually_exclusive_group()
    attention.add_argument("--nr-include-attention", "--nr_include_attention", dest="nr_include_attention",
                           action="store_true", default=True, help="prune q/k/v/o too (default)")
    attention.add_argument("--nr-skip-attention", "--nr_skip_attention", dest="nr_include_attention",
                           action="store_false", help="prune the MLP only")
    _flag(parser, "nr-prune-lm-head", action="store_true", help="also prune lm_head by magnitude (untied if tied)")
    _flag(parser, "pruning_last", type=int, default=None, help="prune only the MLPs of the last N blocks")
    _flag(parser, "prune-router", action="store_true",
          help="also prune Mixture-of-Experts routers and shared-expert gates (dense by default)")
    _flag(parser, "expert-min-tokens", type=int, default=32,
          help="an expert routed fewer calibration tokens than this is pruned by magnitude (default 32)")
    _flag(parser, "expert-group-size", type=_micro_batch, default="auto",
          help="stream each Mixture-of-Experts block's routed experts this many at a time (default auto: only "
               "when the memory plan cannot fit a whole block on the device)")
    _flag(parser, "hybrid-mlp-method", default="neuronrank_tfidf", choices=("neuronrank_tfidf", "neuronrank_old"),
          help="the MLP method of --prune_method hybrid (attention uses Wanda)")


def _sparsegpt_and_budget_flags(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "blocksize", type=int, default=128, help="SparseGPT column block size (default 128)")
    _flag(parser, "percdamp", type=float, default=0.01, help="SparseGPT damping, fraction of mean diag(H)")
    _flag(parser, "hessian-dtype", default="float32", choices=HESSIAN_DTYPES,
          help="SparseGPT/ADMM: sum Hessians in float64, rounding errors kept, so the result does not depend "
               "on micro-batches or ranks (3x their memory; slow on GPUs with little float64 throughput)")
    _flag(parser, "true-sequential", action="store_true",
          help="SparseGPT: prune q/k/v, then o, then gate/up, then down, recomputing inputs in between")
    _flag(parser, "admm-iterations", type=int, default=20,
          help="ADMM weight-update iterations, the mask chosen gradually in the first 3/4 (default 20)")
    _flag(parser, "admm-rho", type=float, default=1.0, help="ADMM penalty on the input-normalised problem (default 1)")
    _flag(parser, "ria-exponent", type=float, default=0.5, help="RIA: exponent of the input norm (default 0.5)")
    _flag(parser, "ria-permute", action="store_true",
          help="RIA with N:M: permute each MLP's neurons so the N:M groups keep more of the score")
    _flag(parser, "layer-sparsity", default="uniform",
          help="uniform (default), owl (outlier-weighted, one dense pass first) or a JSON file: one ratio per block")
    _flag(parser, "owl-lambda", type=float, default=0.08, help="OWL: block ratios stay within this of --sparsity_ratio")
    _flag(parser, "owl-m", type=float, default=5.0, help="OWL: a score above M x its block's mean is an outlier")
    _flag(parser, "remove-layers", default=None,
          help="shortgpt: remove this many blocks (lowest Block Influence), or auto with --target-params")
    _flag(parser, "target-params", default=None,
          help="shortgpt with --remove-layers auto: remove blocks until the model has at most this many "
               "parameters (e.g. 100M, 1.5B)")
    _flag(parser, "angular", action="store_true",
          help="shortgpt: remove the N consecutive blocks whose input and output are closest in angle (Gromov "
               "et al. 2024, last token) instead of the N of lowest Block Influence")
    _flag(parser, "max-device-memory", type=parse_bytes, default=None,
          help="refuse to start if the plan needs more compute-device memory (e.g. 20GiB)")
    _flag(parser, "max-host-memory", type=parse_bytes, default=None,
          help="refuse to start if the plan needs more host memory (e.g. 16GiB)")


def _options(parser: argparse.ArgumentParser, argv: list[str]) -> dict:
    args = vars(parser.parse_args(argv))
    args["neuron_refit"] = args["neuron_refit"] == "on"
    args["overlap_io"] = args["overlap_io"] == "on"
    if args.get("quant_act_order") is not None:
        args["quant_act_order"] = args["quant_act_order"] == "on"
    return args


def _config(parser: argparse.ArgumentParser, argv: list[str]) -> PruneConfig:
    return PruneConfig(**_options(parser, argv))


def plan_parser() -> argparse.ArgumentParser:
    parser = prune_parser()
    parser.prog = "offload-prune plan"
    parser.description = "Print the peak device and host memory a prune run needs; reads only config.json."
    _flag(parser, "ranks", type=int, default=1,
          help="plan one of N torchrun ranks, which caches only its share of the windows (default 1)")
    return parser


def run_plan(argv: list[str]) -> int:
    from .api import planned
    from .plan.memory import check_budget, format_plan

    options = _options(plan_parser(), argv)
    ranks = options.pop("ranks")
    config, plan = planned(PruneConfig(**options).validate(), ranks)
    print(format_plan(plan, config.model) + (f"\n(per rank, for rank 0 of {ranks})" if ranks > 1 else ""))
    check_budget(plan, config)
    return 0


def eval_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="offload-prune eval", description=(
        "Perplexity (--eval-data) and lm-evaluation-harness tasks (--tasks) of a model, streamed block by block."))
    _common(parser, stores=("auto", "ram", "disk"))
    _flag(parser, "max-host-memory", type=parse_bytes, default=None,
          help="refuse to start if the plan of a task evaluation needs more host memory (e.g. 16GiB)")
    _flag(parser, "expert-group-size", type=int, default=None,
          help="run Mixture-of-Experts blocks with their routed experts this many at a time (blocks larger than "
               "the device; the same results)")
    _flag(parser, "json", action="store_true", help="print the result as one JSON object")
    return parser


def run_eval(argv: list[str]) -> int:
    from .api import evaluate_tasks, perplexity
    from .evaluation.tasks import format_task_table

    args = vars(eval_parser().parse_args(argv))
    as_json = args.pop("json")
    if not args["eval_data"] and not args["eval_tasks"]:
        raise OffloadPruneError("eval needs --eval-data (perplexity of a text) or --tasks (lm-eval tasks)")
    result, lines = {}, []
    if args["eval_data"]:
        store = "disk" if args["offload_activations"] == "disk" else "ram"
        result = perplexity(args["model"], args["eval_data"], args["seqlen"], args["eval_max_windows"], args["device"],
                            args["dtype"], args["micro_batch_size"], on_disk=store == "disk", quiet=args["quiet"],
                            expert_group_size=args["expert_group_size"])
        lines.append(f"{result['model']}: perplexity {result['ppl']:.3f} on {result['windows']} windows of "
                     f"{result['seqlen']} tokens ({result['seconds']:.1f} s)")
    if args["eval_tasks"]:
        model = args.pop("model")
        chosen = {k: v for k, v in args.items() if k not in ("eval_data", "eval_max_windows")}
        tasks = evaluate_tasks(model, **{**chosen, "expert_group_size": chosen["expert_group_size"] or "auto"})
        result = {**result, **tasks}
        lines += [f"{tasks['model']}: lm-eval tasks ({tasks['seconds']:.1f} s)", *format_task_table({"value": tasks})]
    print(json.dumps(result, default=str) if as_json else "\n".join(lines))
    return 0


def run_prune(argv: list[str]) -> int:
    from .stream.pipeline import prune

    prune(_config(prune_parser(), argv))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("prune", "eval", "plan") else "prune"
    try:
        return {"eval": run_eval, "plan": run_plan, "prune": run_prune}[command](argv)
    except OffloadPruneError as exc:
        print(f"offload-prune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("offload-prune: interrupted; every finished block is saved: run the same command again "
              "to resume", file=sys.stderr)
        return 130
