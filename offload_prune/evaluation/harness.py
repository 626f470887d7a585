"""The streamed model as an lm-evaluation-harness backend (`offload_prune`): lm-eval builds the requests,
this scores them with the stream (scoring.py), one pass over the checkpoint per request type.

Needs lm-eval (the `eval` extra); importing this module registers the backend, so that after
`import offload_prune.evaluation.harness`, `lm_eval.simple_evaluate(model="offload_prune",
model_args="pretrained=PATH")` works, and `offload-prune-lm-eval` is lm-eval's own command line with it.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import resolve_max_length

from ..basics import OffloadPruneError, format_bytes, parse_bytes
from ..disk.checkpoint import CheckpointReader
from ..model.loading import load_tokenizer, pick_device
from ..plan.evaluation import choose_store, evaluation_plan
from ..plan.memory import STORE_WORDS, pick_dtype
from ..runtime.meter import PhaseMeter, current_host_rss_bytes
from .requests import pack
from .scoring import score

#: Where evaluations keep their resumable state when no work folder is given.
DEFAULT_WORK = Path(tempfile.gettempdir()) / "offload-prune-eval"


@register_model("offload_prune", "offload-prune")
class StreamedLM(TemplateLM):
    """A causal LM read block by block from its safetensors shards for every batch of requests."""

    def __init__(self, pretrained: str, device: str = "auto", dtype: str = "auto", micro_batch_size: int = 1,
                 offload_activations: str = "auto", max_length: int | None = None, add_bos_token: bool | None = None,
                 max_host_memory: int | str | None = None, work_dir: str | Path | None = None, quiet: bool = False,
                 label: str = "eval", expert_group_size: int | None = None, batch_size=None, max_batch_size=None):
        super().__init__()
        del batch_size, max_batch_size  # lm-eval passes them to every backend; the micro-batch is ours
        self.reader = CheckpointReader(str(pretrained))
        self.tokenizer = load_tokenizer(self.reader.folder)
        if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI asks for cuda:0 by default
            print(f"{label}: no CUDA here; computing on the CPU", file=sys.stderr)
            device = "cpu"
        self.compute_device = pick_device(str(device))
        self.dtype = pick_dtype(str(dtype), self.compute_device, self.reader)
        self.micro_batch_size = int(micro_batch_size)
        if self.micro_batch_size < 1:
            raise OffloadPruneError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.store = str(offload_activations)
        self._max_length = int(max_length) if max_length else None
        self.add_bos_token = add_bos_token
        self._prefix_text = self.tokenizer.decode(self.prefix_token_id)  # tok_encode's check, once, not per request
        self.max_host_memory = parse_bytes(max_host_memory) if isinstance(max_host_memory, str) else max_host_memory
        self.work = Path(work_dir) if work_dir else DEFAULT_WORK
        self.quiet, self.label = bool(quiet), label
        # Mixture-of-Experts blocks larger than the device: routed experts this many at a time (the same scores).
        self.expert_group_size = int(expert_group_size) if expert_group_size else None
        self.meter = PhaseMeter(self.compute_device)
        #: One entry per streamed pass: its requests, windows, plan, seconds and measured peaks.
        self.passes: list[dict] = []
        #: The passes' folders under the work folder (their scores; dropped once the caller has them).
        self.state_folders: list[Path] = []

    # -- what lm-eval asks of a model ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or resolve_max_length(self.reader.config, self.tokenizer)

    @property
    def device(self) -> torch.device:
        return self.compute_device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As HFLM encodes: the tokenizer's own special tokens unless told otherwise, none before a string that
        already starts with the prefix token."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if string.startswith(self._prefix_text):
                add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        if not requests:
            return []
        packed = pack([(list(context), list(continuation)) for _, context, continuation in requests],
                      self.max_length, self.eot_token_id)

        def plan_for(store: str) -> dict:
            return evaluation_plan(self.reader.config, self.compute_device.type, str(self.dtype).replace("torch.", ""),
                                   store, packed.windows, packed.padded_tokens, packed.longest, self.micro_batch_size,
                                   current_host_rss_bytes(), self.reader.dtypes.values(), self.expert_group_size)
        plan = choose_store(self.store, plan_for, self.max_host_memory)
        if not self.quiet:
            print(f"{self.label}: {len(requests)} requests in {packed.windows} windows ({packed.padded_tokens} tokens); "
                  f"planned host peak {format_bytes(plan['host']['peak'])}, request cache "
                  f"{format_bytes(plan['request_cache_bytes'])} {STORE_WORDS[plan['activation_store']]}",
                  file=sys.stderr)
        phase = f"pass_{len(self.passes)}"
        with self.meter(phase):
            scores, folder = score(self.reader, packed, self.compute_device, self.dtype, plan["activation_store"],
                                   self.micro_batch_size, self.work, quiet=self.quiet or disable_tqdm, label=self.label,
                                   expert_group_size=self.expert_group_size)
        self.state_folders.append(folder)
        self.passes.append({"requests": len(requests), "windows": packed.windows, "padded_tokens": packed.padded_tokens,
                            "plan": plan, "seconds": self.meter.seconds[phase], "peaks": self.meter.peaks[phase]})
        for (strings, _, _), answer in zip(requests, scores):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text cut into lm-eval's disjoint rolling windows; all windows of all texts in one pass."""
        windows, owners = [], []
        for number, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(number)
        totals = [0.0] * len(requests)
        for owner, (value, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += value
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        tasks = sorted({request.task_name for request in requests if getattr(request, "task_name", None)})
        raise OffloadPruneError(f"generation tasks ({', '.join(tasks) or 'generate_until'}) are not supported: each "
                                "generated token would read every block once more; the streamed backend scores "
                                "log-likelihoods (multiple choice, perplexity)")


def lm_eval_main() -> None:
    """lm-eval's own command line, with the `offload_prune` backend registered (by importing this module)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
