"""The end of a pruning run: both evaluations, report.json (the last committed step) and the summary.
"""
from __future__ import annotations

import json
import math

import torch

from ..disk import durable
from ..disk.checkpoint import CheckpointReader
from ..evaluation.perplexity import perplexity
from ..evaluation.tasks import evaluate_tasks
from .passes import Run
from .removal_pass import removal_report
from .report import format_summary, totals

REPORT_NAME = "report.json"


def evaluate_and_report(run: Run, evaluation: torch.Tensor | None, plan: dict, dtype: torch.dtype,
                        resumed: bool) -> dict:
    config, state, meter, device = run.config, run.state, run.meter, run.device
    num_layers = run.streamed.num_layers
    report = {
        "save": str(state.save), "model": str(run.reader.folder), "method": config.prune_method,
        "sparsity_type": config.sparsity_type, "target_sparsity": config.effective_sparsity,
        "options": config.result_options(run.method.options), "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "resumed": resumed, "ranks": run.ranks.world,
        # How to reproduce it: the data by name or path, and the versions that computed it.
        "calibration": {"data": config.calib_data, "nsamples": config.nsamples, "seqlen": config.seqlen,
                        "seed": config.seed},
        "evaluation_data": config.eval_data if evaluation is not None else None,
        "versions": state.manifest["fingerprint"]["versions"],
        "memory_plan": plan, "modules": state.modules, "unpruned": state.manifest["unpruned"],
        "totals": totals(state.modules, state.manifest["unpruned"]),
        "nm_valid": all(m["nm_valid"] for m in state.modules.values()) if config.nm else None,
        "layer_sparsity": {"rule": config.layer_sparsity if config.layer_sparsity in ("uniform", "owl") else "file",
                           "ratios": [run.block_sparsity(i) for i in range(run.streamed.num_layers)],
                           **({"outlier_ratios": [m["outlier_ratio"] for m in state.manifest["outliers"]],
                               "owl_lambda": config.owl_lambda, "owl_m": config.owl_m,
                               "weighted_mean": _weighted_mean([run.block_sparsity(i) for i in range(num_layers)],
                                                               [m["weights"] for m in state.manifest["outliers"]])}
                              if config.layer_sparsity == "owl" else {})},
    }
    if run.method.removes_blocks:
        report["target_sparsity"] = None
        report["block_removal"] = removal_report(run)
        del report["layer_sparsity"]
    if config.sparsity_type == "structured":
        widths = {m["neurons"]: m["neurons_kept"] for m in state.modules.values() if "neurons" in m}
        groups = {m["key_value_groups"]: m["key_value_groups_kept"] for m in state.modules.values()
                  if "key_value_groups" in m}
        params_after, _ = run.layout.written_totals(state.save)
        report["structured"] = {"shrink": config.shrink, "neuron_refit": config.neuron_refit,
                                "widths": [[before, after] for before, after in sorted(widths.items())],
                                "key_value_groups": [[before, after] for before, after in sorted(groups.items())],
                                "params_before": sum(math.prod(shape) for shape in run.reader.shapes.values()),
                                "params_after": params_after}
    if run.expert_groups:
        report["expert_groups"] = {"size": config.expert_group_size,
                                   "groups": {i: len(g.bounds) for i, g in run.expert_groups.items()},
                                   "seconds_per_group": run.group_seconds}  # read, statistics, prune, handed to write
    if config.reconstruct != "off":
        blocks = state.manifest.get("reconstruction", {})
        report["reconstruction"] = {"mode": config.reconstruct, "target": config.recon_target,
                                    "steps": config.recon_steps, "lr": config.recon_lr,
                                    "blocks": {int(i): entry for i, entry in sorted(blocks.items(), key=lambda kv: int(kv[0]))}}
    if config.quantize != "off":
        entries = [m["quantization"] for m in [*state.modules.values(), *state.manifest["unpruned"].values()]
                   if "quantization" in m]
        _, bytes_after = run.layout.written_totals(state.save)
        report["quantization"] = {
            "scheme": config.quantize, "method": "sparsegpt joint sweep" if config.quant_joint else config.quant_method,
            "group_size": config.quant_group_size,
            "symmetric": not config.quant_asym, "act_order": config.quant_act_order, "format": "pack-quantized",
            "matrices": len(entries), "errors": sorted(e["quantization_error"] for e in entries
                                                       if "quantization_error" in e),
            "bytes_before": sum(run.reader.nbytes(name) for name in run.reader.weight_map), "bytes_after": bytes_after}
    if evaluation is not None:
        options = dict(micro_batch_size=config.micro_batch_size, on_disk=config.offload_activations == "disk",
                       quiet=config.quiet, expert_group_size=config.expert_group_size if run.expert_groups else None)
        report["perplexity"] = {}
        for which, folder in (("dense", run.reader.folder), ("pruned", state.save)):
            with meter(f"eval_{which}"):
                report["perplexity"][which] = perplexity(CheckpointReader(str(folder)), evaluation, device, dtype,
                                                         label=f"eval {which}", **options)
    if config.eval_tasks and run.ranks.lead:
        report["task_evaluation"] = {}
        for which, folder in (("dense", run.reader.folder), ("pruned", state.save)):
            with meter(f"eval_tasks_{which}"):
                report["task_evaluation"][which] = evaluate_tasks(folder, config, label=f"eval {which}")
    report["seconds"] = meter.seconds
    report["phase_peaks"] = meter.peaks
    report["phase_peaks_are_per_phase"] = meter.host_resets  # False: VmHWM could not be reset (not Linux)
    report["peak_host_rss_bytes"] = meter.overall("host")
    report["peak_device_bytes"] = meter.overall("device_reserved")
    record = durable.write_text(state.save / REPORT_NAME, json.dumps(report, indent=1, default=str) + "\n")
    state.commit(outputs={REPORT_NAME: record}, stage=run.streamed.num_layers + 1, finished=True)
    if not config.quiet:
        print(format_summary(report))
    return report


def _weighted_mean(ratios: list[float], weights: list[int]) -> float | None:
    """The blocks' ratios averaged by their prunable weights: what OWL's ratios give over the model."""
    return sum(r * w for r, w in zip(ratios, weights)) / sum(weights) if sum(weights) else None
