"""One dataclass for every option of a run, validated once before any weight is read."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .basics import OffloadPruneError, parse_bytes, parse_count


METHODS = ("magnitude", "wanda", "sparsegpt", "admm", "ria", "neuronrank_old", "neuronrank_tfidf", "hybrid",
           "shortgpt", "flap")
#: Methods with a neuron score, for --sparsity_type structured (whole MLP neurons).
STRUCTURED_METHODS = ("magnitude", "wanda", "flap", "neuronrank_old", "neuronrank_tfidf")
#: Those whose neuron score also reads an attention output projection (--prune-heads).
HEAD_METHODS = ("magnitude", "wanda", "flap")
ACTIVATION_STORES = ("ram", "disk", "device", "auto")
DTYPES = ("auto", "float32", "float16", "bfloat16")
HESSIAN_DTYPES = ("float32", "float64")
RECONSTRUCT_MODES = ("off", "block", "sublayer")
RECON_TARGETS = ("dense-block", "dense-stream")
RECON_OPTIMIZERS = ("adam", "sgd")
RECON_DTYPES = ("auto", "float32", "bfloat16")
#: --quantize schemes: integer weights of this many bits, 16-bit activations (what vLLM serves).
QUANT_SCHEMES = {"off": 0, "w4a16": 4, "w8a16": 8}
QUANT_METHODS = ("gptq", "rtn")
OUTPUT_DTYPES = ("auto", "bfloat16")
#: --eval-tasks default: the zero-shot set of the Wanda and SparseGPT papers.
DEFAULT_EVAL_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


@dataclass
class PruneConfig:
    model: str
    save: Path | None = None
    prune_method: str = "wanda"
    sparsity_ratio: float = 0.5
    sparsity_type: str = "unstructured"
    calib_data: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    micro_batch_size: int | str = "auto"  # auto: chosen by the plan (plan/micro_batch.py)
    offload_activations: str = "ram"
    # Read block i+1 and write block i-1 on helper threads while block i computes (one more block of
    # each on the host); off: everything in series, the least memory.
    overlap_io: bool = True
    eval_ppl: bool = False
    eval_data: str | None = None
    eval_max_windows: int | None = None
    # lm-evaluation-harness tasks, streamed (evaluation/tasks.py): comma-separated names, or "default".
    eval_tasks: str | None = None
    eval_limit: float | None = None  # documents per task (below 1: a fraction of them)
    eval_num_fewshot: int | None = None
    eval_include_path: str | None = None  # a folder of local task YAMLs, as lm-eval's --include_path
    eval_work_dir: str | None = None  # the evaluation's resumable state (default: the temporary folder)
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    # SparseGPT
    blocksize: int = 128
    percdamp: float = 0.01
    true_sequential: bool = False
    # SparseGPT and ADMM sum x x^T in this dtype. float64: window by window, with the rounding errors
    # kept (hessian_sums.CompensatedSum), so the float32 Hessian the solve uses is the same bit for bit
    # however windows were grouped into micro-batches or split across ranks; three times the memory.
    hessian_dtype: str = "float32"
    # ADMM (Boza 2024): iterations of the weight update, the mask chosen gradually in the first 3/4;
    # rho is the ADMM penalty on the input-normalised problem (the paper's defaults).
    admm_iterations: int = 20
    admm_rho: float = 1.0
    # RIA (Zhang et al. 2024): exponent of the input norm; for N:M, permute MLP neurons first.
    ria_exponent: float = 0.5
    ria_permute: bool = False
    # Per-block sparsity: uniform, owl (one dense pass first), or a JSON file of ratios.
    layer_sparsity: str = "uniform"
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    # NeuronRank family and module selection (seeds 000-003)
    # Defaults of neuronrank_tfidf: the best setting of the sweep in the README over both real models
    # (topic mode, input score, gamma -0.25, q_active 0.4); the seeds' definition is --nr-score neuron
    # --nr-tfidf-mode doc --nr-q-active 0.6.
    nr_tfidf_mode: str = "topic"
    nr_tfidf_k: int = 64
    nr_q_active: float = 0.40
    nr_spikiness_exp: float = 0.0
    weight_exp: float = 1.0
    tf_exp: float = 1.0
    idf_exp: float = 1.0
    nr_mlp_signal: str = "down_input"
    nr_score: str = "input"
    nr_input_idf_exp: float = -0.25
    nr_include_attention: bool = True
    nr_prune_lm_head: bool = False
    pruning_last: int | None = None
    hybrid_mlp_method: str = "neuronrank_tfidf"
    # Structured (whole MLP neurons): remove them from the matrices and shrink intermediate_size, or zero
    # them; refit the output matrix on the kept neurons by least squares.
    shrink: bool = False
    neuron_refit: bool = True
    # Fraction of each attention layer's key/value groups (with their query heads) removed, structured.
    prune_heads: float = 0.0
    # ShortGPT: remove this many whole blocks, or "auto" down to --target-params parameters.
    remove_layers: str | None = None
    target_params: str | None = None
    angular: bool = False  # remove the contiguous run with the smallest angular distance (Gromov et al.)
    # Mixture-of-Experts
    prune_router: bool = False
    expert_min_tokens: int = 32
    # Routed experts per group when a block streams expert group by expert group (auto: the plan decides).
    expert_group_size: int | str = "auto"
    # Block-local reconstruction after the mask (reconstruct/): the kept weights trained so that the block's
    # output (block), or its attention's and its MLP's one after the other (sublayer), matches the target: the
    # dense block on the same inputs (dense-block) or the dense model's own stream (dense-stream).
    reconstruct: str = "off"
    recon_target: str = "dense-stream"  # measured better on every SmolLM2 setting (docs/benchmarks.md)
    # Defaults measured on SmolLM2 (docs/benchmarks.md): one window a step costs ~1 % of perplexity against two
    # at half the training time.
    recon_steps: int = 64
    recon_batch: int = 1  # windows per optimiser step, over all ranks
    recon_lr: float = 1e-3
    recon_optimizer: str = "adam"
    recon_norms: bool = False  # train biases and norm weights too
    recon_dtype: str = "auto"  # the training steps' products (reconstruct/precision.py); resolved before the run
    # Quantization after the mask (quantize/), written as compressed-tensors' pack-quantized checkpoint.
    quantize: str = "off"
    quant_method: str = "gptq"
    quant_group_size: int = 128  # input columns sharing a scale; -1: one scale per output channel
    quant_asym: bool = False  # a zero point per group (min/max) instead of symmetric scales
    # GPTQ quantizes columns by decreasing Hessian diagonal; None: on for GPTQ after the mask (measured better on
    # SmolLM2, docs/benchmarks.md), off where there is no such order (RTN, SparseGPT's joint sweep).
    quant_act_order: bool | None = None
    quant_joint: bool = False  # SparseGPT prunes and quantizes in one sweep instead of GPTQ after the mask
    # An FP8 checkpoint's weights are written back as FP8 with fresh block scales (auto), or as bfloat16.
    output_dtype: str = "auto"
    # Budgets checked against the memory plan before any weight is read (bytes; None = no limit).
    max_device_memory: int | None = None
    max_host_memory: int | None = None
    # Derived by validate(): (pruned per group, group size) for N:M, else None.
    nm: tuple[int, int] | None = field(default=None, init=False)
    # Derived by validate() from --remove-layers / --target-params: a count of blocks, or a parameter budget.
    blocks_to_remove: int | None = field(default=None, init=False)
    param_budget: int | None = field(default=None, init=False)

    def validate(self) -> "PruneConfig":
        # From Python, paths may come as str and memory budgets as "20GiB", as the CLI takes them.
        if self.save is not None:
            self.save = Path(self.save)
        for name in ("max_device_memory", "max_host_memory"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, parse_bytes(getattr(self, name)))
        if self.prune_method not in METHODS:
            raise OffloadPruneError(
                f"--prune_method {self.prune_method!r} is not one of {', '.join(METHODS)}")
        if not 0.0 <= self.sparsity_ratio < 1.0:
            raise OffloadPruneError(f"--sparsity_ratio must be in [0, 1), got {self.sparsity_ratio}")
        if self.sparsity_type == "structured":
            if self.prune_method not in STRUCTURED_METHODS:
                raise OffloadPruneError("--sparsity_type structured (whole MLP neurons) needs a neuron score: "
                                        f"--prune_method {', '.join(STRUCTURED_METHODS)}")
            if self.shrink and self.layer_sparsity != "uniform":
                raise OffloadPruneError("--shrink keeps one MLP width for every layer (config.json holds one): "
                                        "--layer-sparsity must be uniform")
            self.nm = None
        else:
            self.nm = parse_sparsity_type(self.sparsity_type)
        if not 0.0 <= self.prune_heads < 1.0:
            raise OffloadPruneError(f"--prune-heads must be in [0, 1), got {self.prune_heads}")
        if self.prune_heads and (self.sparsity_type != "structured" or self.prune_method not in HEAD_METHODS):
            raise OffloadPruneError("--prune-heads removes whole key/value groups of attention heads: it goes with "
                                    f"--sparsity_type structured and --prune_method {', '.join(HEAD_METHODS)}")
        if self.shrink and self.sparsity_type != "structured":
            raise OffloadPruneError("--shrink removes whole MLP neurons: it goes with --sparsity_type structured")
        if self.prune_method == "flap" and self.sparsity_type != "structured":
            raise OffloadPruneError("--prune_method flap scores whole MLP neurons: use --sparsity_type structured")
        if self.nr_tfidf_mode not in ("doc", "topic"):
            raise OffloadPruneError(f"--nr-tfidf-mode must be doc or topic, got {self.nr_tfidf_mode!r}")
        if self.nr_mlp_signal not in ("down_input", "gate"):
            raise OffloadPruneError(f"--nr-mlp-signal must be down_input or gate, got {self.nr_mlp_signal!r}")
        if self.nr_score not in ("input", "neuron"):
            raise OffloadPruneError(f"--nr-score must be input or neuron, got {self.nr_score!r}")
        if self.hybrid_mlp_method not in ("neuronrank_tfidf", "neuronrank_old"):
            raise OffloadPruneError("--hybrid-mlp-method must be neuronrank_tfidf or neuronrank_old")
        self._validate_tfidf_exponents()
        if not 0.0 <= self.nr_q_active < 1.0:
            raise OffloadPruneError(f"--nr-q-active must be in [0, 1), got {self.nr_q_active}")
        if self.expert_min_tokens < 1:
            raise OffloadPruneError(f"--expert-min-tokens must be >= 1, got {self.expert_min_tokens}")
        if self.expert_group_size != "auto" and not (isinstance(self.expert_group_size, int) and self.expert_group_size >= 1):
            raise OffloadPruneError(f"--expert-group-size must be auto or a number >= 1, got {self.expert_group_size!r}")
        if self.nr_tfidf_k < 1 or (self.pruning_last is not None and self.pruning_last < 1):
            raise OffloadPruneError("--nr-tfidf-k and --pruning_last must be >= 1")
        if self.nm is not None and self.prune_method == "sparsegpt" and self.blocksize % self.nm[1]:
            raise OffloadPruneError(f"--blocksize {self.blocksize} must be a multiple of M={self.nm[1]} for "
                                    f"--sparsity_type {self.sparsity_type}: SparseGPT chooses each group of M "
                                    "columns inside one column block")
        if self.admm_iterations < 1 or self.admm_rho <= 0:
            raise OffloadPruneError("--admm-iterations must be >= 1 and --admm-rho > 0")
        if self.ria_permute and (self.prune_method != "ria" or self.nm is None):
            raise OffloadPruneError("--ria-permute is channel permutation for N:M sparsity with --prune_method ria")
        self._validate_layer_sparsity()
        self._validate_block_removal()
        self._validate_reconstruction()
        self._validate_quantization()
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise OffloadPruneError(f"--hessian-dtype must be one of {HESSIAN_DTYPES}, got {self.hessian_dtype}")
        if self.percdamp < 0:
            raise OffloadPruneError(f"--percdamp must be >= 0, got {self.percdamp}")
        if self.micro_batch_size != "auto" and not (isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 1):
            raise OffloadPruneError(f"--micro-batch-size must be auto or a number >= 1, got {self.micro_batch_size!r}")
        for name in ("nsamples", "seqlen", "blocksize"):
            if getattr(self, name) < 1:
                raise OffloadPruneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_max_windows is not None and self.eval_max_windows < 1:
            raise OffloadPruneError("--eval-max-windows must be >= 1")
        if self.offload_activations not in ACTIVATION_STORES:
            raise OffloadPruneError(f"--offload-activations must be one of {ACTIVATION_STORES}")
        if self.dtype not in DTYPES:
            raise OffloadPruneError(f"--dtype must be one of {DTYPES}")
        if self.eval_ppl and not self.eval_data:
            raise OffloadPruneError("--eval-ppl needs --eval-data (a local text file, or wikitext2 with `datasets`)")
        self._validate_task_evaluation()
        if self.output_dtype not in OUTPUT_DTYPES:
            raise OffloadPruneError(f"--output-dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {self.output_dtype!r}")
        return self

    def _validate_task_evaluation(self) -> None:
        if self.eval_tasks is not None and not self.task_names:
            raise OffloadPruneError("--eval-tasks needs task names, comma-separated (or default: "
                                    f"{','.join(DEFAULT_EVAL_TASKS)})")
        if self.eval_limit is not None and self.eval_limit <= 0:
            raise OffloadPruneError(f"--limit must be > 0 (documents per task, or below 1 a fraction), got {self.eval_limit}")
        if self.eval_num_fewshot is not None and self.eval_num_fewshot < 0:
            raise OffloadPruneError(f"--num-fewshot must be >= 0, got {self.eval_num_fewshot}")
        if self.eval_include_path is not None and not Path(self.eval_include_path).expanduser().exists():
            raise OffloadPruneError(f"--include-path {self.eval_include_path}: no such file or folder")

    @property
    def task_names(self) -> list[str]:
        """--eval-tasks as a list, `default` expanded."""
        names = [name.strip() for name in (self.eval_tasks or "").split(",") if name.strip()]
        return [n for name in names for n in (DEFAULT_EVAL_TASKS if name == "default" else (name,))]

    def replaced(self, **changes) -> "PruneConfig":
        """A copy with these options changed, validated: `dataclasses.replace` alone would leave the
        fields validate() derives (N:M, the blocks to remove) at their defaults."""
        return replace(self, **changes).validate()

    def _validate_tfidf_exponents(self) -> None:
        """One parameter, one flag: a TF-IDF exponent the chosen score does not read is refused, not ignored.
        --nr-score input (per weight, unstructured) reads only --nr-input-idf-exp; the neuron score (--nr-score
        neuron, or any structured run) reads --idf-exp, --tf-exp and --nr-spikiness-exp."""
        tfidf = self.prune_method == "neuronrank_tfidf" or (
            self.prune_method == "hybrid" and self.hybrid_mlp_method == "neuronrank_tfidf")
        if not tfidf:
            return
        by_input = self.nr_score == "input" and self.sparsity_type != "structured"
        defaults = {f.name: f.default for f in fields(self)}
        ignored = (("idf_exp", "tf_exp", "nr_spikiness_exp") if by_input else ("nr_input_idf_exp",))
        changed = [name for name in ignored if getattr(self, name) != defaults[name]]
        if changed:
            flag = "--" + changed[0].replace("_", "-")
            raise OffloadPruneError(
                f"{flag} is not read by the input score (--nr-score input): its IDF exponent is --nr-input-idf-exp"
                if by_input else
                f"{flag} is the input score's IDF exponent (--nr-score input, unstructured); the neuron score's is "
                "--idf-exp")

    def _validate_layer_sparsity(self) -> None:
        if self.layer_sparsity == "uniform":
            return
        if self.nm is not None:
            raise OffloadPruneError(f"--layer-sparsity {self.layer_sparsity} needs unstructured sparsity: "
                                    f"{self.sparsity_type} fixes every block's ratio")
        if self.layer_sparsity == "owl":
            if self.owl_lambda < 0 or self.owl_m <= 0:
                raise OffloadPruneError("--owl-lambda must be >= 0 and --owl-m > 0")
            if not 0 <= self.sparsity_ratio - self.owl_lambda or self.sparsity_ratio + self.owl_lambda >= 1:
                raise OffloadPruneError(f"--owl-lambda {self.owl_lambda}: block ratios within it of --sparsity_ratio "
                                        f"{self.sparsity_ratio} must stay in [0, 1)")
        elif not Path(self.layer_sparsity).is_file():
            raise OffloadPruneError(f"--layer-sparsity must be uniform, owl or a JSON file of ratios; "
                                    f"{self.layer_sparsity} is none of them")

    def _validate_reconstruction(self) -> None:
        choices = {"reconstruct": RECONSTRUCT_MODES, "recon_target": RECON_TARGETS,
                   "recon_optimizer": RECON_OPTIMIZERS, "recon_dtype": RECON_DTYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise OffloadPruneError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                        f"got {getattr(self, name)!r}")
        if self.recon_steps < 1 or self.recon_batch < 1:
            raise OffloadPruneError(f"--recon-steps and --recon-batch must be >= 1, got {self.recon_steps} and "
                                    f"{self.recon_batch}")
        if not self.recon_lr > 0:  # also refuses nan
            raise OffloadPruneError(f"--recon-lr must be > 0, got {self.recon_lr}")

    def _validate_quantization(self) -> None:
        if self.quantize not in QUANT_SCHEMES:
            raise OffloadPruneError(f"--quantize must be one of {', '.join(QUANT_SCHEMES)}, got {self.quantize!r}")
        if self.quant_method not in QUANT_METHODS:
            raise OffloadPruneError(f"--quant-method must be one of {', '.join(QUANT_METHODS)}, got {self.quant_method!r}")
        if self.quant_group_size != -1 and self.quant_group_size < 1:
            raise OffloadPruneError(f"--quant-group-size must be -1 (per output channel) or >= 1, "
                                    f"got {self.quant_group_size}")
        if self.quant_act_order is None:
            self.quant_act_order = self.quantize != "off" and self.quant_method == "gptq" and not self.quant_joint
        if self.quant_act_order and self.quant_method != "gptq":
            raise OffloadPruneError("--quant-act-order is GPTQ's column order; --quant-method rtn has none")
        if self.quant_joint:
            if self.quantize == "off" or self.prune_method != "sparsegpt":
                raise OffloadPruneError("--quant-joint is SparseGPT's sweep pruning and quantizing at once: it goes "
                                        "with --prune_method sparsegpt and --quantize")
            if self.quant_act_order:
                raise OffloadPruneError("--quant-joint sweeps the columns in SparseGPT's order; --quant-act-order "
                                        "is GPTQ's")
            if self.quant_group_size != -1 and self.blocksize % self.quant_group_size:
                raise OffloadPruneError(f"--quant-joint needs --blocksize ({self.blocksize}) to be a multiple of "
                                        f"--quant-group-size ({self.quant_group_size})")
        if self.quantize != "off" and self.prune_method == "shortgpt":
            raise OffloadPruneError("--quantize goes with a method that prunes weights; --prune_method shortgpt "
                                    "copies the blocks it keeps")

    @property
    def quant_bits(self) -> int:
        return QUANT_SCHEMES[self.quantize]

    def _validate_block_removal(self) -> None:
        if self.prune_method != "shortgpt":
            if self.remove_layers is not None or self.target_params is not None or self.angular:
                raise OffloadPruneError("--remove-layers, --target-params and --angular go with "
                                        "--prune_method shortgpt")
            return
        if self.remove_layers is None:
            raise OffloadPruneError("--prune_method shortgpt needs --remove-layers N (blocks to remove), or "
                                    "--remove-layers auto --target-params P")
        if self.sparsity_type != "unstructured" or self.layer_sparsity != "uniform":
            raise OffloadPruneError("--prune_method shortgpt removes whole blocks: --sparsity_type and "
                                    "--layer-sparsity do not apply")
        if self.remove_layers == "auto":
            if self.angular:
                raise OffloadPruneError("--angular removes a run of --remove-layers N blocks: give N, not auto")
            if self.target_params is None:
                raise OffloadPruneError("--remove-layers auto needs --target-params (e.g. 100M, 1.5B)")
            self.param_budget = parse_count(self.target_params)
            return
        if self.target_params is not None:
            raise OffloadPruneError("--target-params goes with --remove-layers auto")
        if not self.remove_layers.isdigit() or int(self.remove_layers) < 1:
            raise OffloadPruneError(f"--remove-layers must be a number of blocks >= 1 or auto, "
                                    f"got {self.remove_layers!r}")
        self.blocks_to_remove = int(self.remove_layers)

    @property
    def effective_sparsity(self) -> float:
        return self.nm[0] / self.nm[1] if self.nm else self.sparsity_ratio

    def result_options(self, method_options: tuple[str, ...] = ()) -> dict:
        """The options that change the pruned weights, as the method reads them: what a resumed run
        must share. Paths, device and dtype spellings are identified elsewhere, by what they resolve to."""
        names = ["prune_method", "sparsity_type", "nsamples", "seqlen", "seed", "micro_batch_size",
                 "nr_include_attention", "pruning_last", "nr_prune_lm_head", "prune_router", "expert_min_tokens",
                 "layer_sparsity", *method_options]
        if self.layer_sparsity == "owl":
            names += ["owl_lambda", "owl_m"]
        if self.sparsity_type == "structured":
            names += ["shrink", "neuron_refit", "percdamp", "prune_heads"]
        if self.reconstruct != "off":
            names += ["reconstruct", "recon_target", "recon_steps", "recon_batch", "recon_lr", "recon_optimizer",
                      "recon_norms", "recon_dtype"]
        if self.quantize != "off":
            names += ["quantize", "quant_method", "quant_group_size", "quant_asym", "quant_act_order", "quant_joint"]
        if self.output_dtype != "auto":
            names.append("output_dtype")
        if self.nm is None:  # N:M fixes the ratio itself
            names.insert(1, "sparsity_ratio")
        return {name: getattr(self, name) for name in names}


def parse_sparsity_type(text: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M): N weights of every M consecutive inputs are pruned."""
    if text == "unstructured":
        return None
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise OffloadPruneError(
            f"--sparsity_type must be 'unstructured', 'structured' or N:M such as 2:4, got {text!r}") from None
    if not 0 < n < m:
        raise OffloadPruneError(f"--sparsity_type {text}: N:M needs 0 < N < M")
    return n, m
