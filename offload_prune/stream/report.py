"""Measuring a run (sparsity per module, phase times, peak memory) and telling the user."""
from __future__ import annotations

from typing import Callable

import torch

from ..basics import format_bytes
from ..evaluation.tasks import format_task_table
from ..runtime.masks import chunks_of, nm_holds


def module_stats(weight: torch.Tensor, nm: tuple[int, int] | None, written_as: torch.dtype | None = None) -> dict:
    """Shape, zeros and sparsity (and N:M validity) of a weight matrix as it is written: converted to
    `written_as` (a float32 weight too small for float16 is written as a zero), a chunk of rows at a time
    (no copy of the whole matrix is made)."""
    rows = weight.detach().reshape(-1, weight.shape[-1])
    checks_nm = nm is not None and rows.shape[-1] % nm[1] == 0
    # Counted on the weight's device and read once at the end: no host sync per chunk on a GPU.
    nonzeros = torch.zeros((), dtype=torch.int64, device=rows.device)
    valid = torch.ones((), dtype=torch.bool, device=rows.device)
    for chunk in chunks_of(rows):
        part = rows[chunk].to(written_as) if written_as is not None else rows[chunk]
        nonzeros += torch.count_nonzero(part)  # far faster than (w == 0).sum() on fp16
        if checks_nm:
            valid &= nm_holds(part, nm)
    zeros = weight.numel() - int(nonzeros)
    stats = {"shape": list(weight.shape), "numel": weight.numel(), "zeros": zeros,
             "sparsity": zeros / weight.numel()}
    if nm is not None:
        stats["nm_valid"] = checks_nm and bool(valid)
    return stats


def matrix_entries(prefix: str, matrices: dict, chosen: dict, rule: Callable[[str], str],
                   method_info: dict[str, dict], nm: tuple[int, int] | None,
                   written_as: Callable[[object], torch.dtype | None]) -> tuple[dict[str, dict], dict[str, dict]]:
    """The report's entries of a block's (or an expert group's) weight matrices, under `prefix`: the pruned
    ones (in `chosen`) with their rule and what the method said of them, and the others apart; each counted
    as `written_as(matrix)` stores it."""
    stats = {name: {**module_stats(m.weight, nm if name in chosen else None, written_as(m)), "kind": m.kind}
             for name, m in matrices.items()}
    pruned = {prefix + n: {**stats[n], "rule": rule(n), **method_info.get(n, {})} for n in matrices if n in chosen}
    return pruned, {prefix + n: stats[n] for n in matrices if n not in chosen}


def totals(modules: dict[str, dict], unpruned: dict[str, dict]) -> dict[str, dict]:
    """Weights and zeros by kind (attention, mlp, router, lm_head) and over `all` the weight matrices in
    the blocks, pruned (`modules`) or not (`unpruned`), and the pruned head when there is one."""
    out: dict[str, dict] = {}
    for name, stats in {**unpruned, **modules}.items():
        for kind in (stats["kind"], "all"):
            entry = out.setdefault(kind, {"modules": 0, "numel": 0, "zeros": 0})
            entry["modules"] += 1
            entry["numel"] += stats["numel"]
            entry["zeros"] += stats["zeros"]
    for entry in out.values():
        entry["sparsity"] = entry["zeros"] / entry["numel"] if entry["numel"] else 0.0
    return dict(sorted(out.items(), key=lambda item: item[0] == "all"))


def format_summary(report: dict) -> str:
    removal = report.get("block_removal")
    if removal:
        lines = [_removal_summary(report, removal)]
    elif report.get("structured"):  # what was removed, not a table of (almost) no zeros
        lines = [f"offload-prune: {report['method']} structured -> {report.get('save', '')}",
                 *_structured_summary(report["structured"]), *_rules_summary(report)]
    else:
        lines = [f"offload-prune: {report['method']} {report['sparsity_type']} "
                 f"(target sparsity {report['target_sparsity']:.2%}) -> {report.get('save', '')}",
                 *_sparsity_summary(report)]
    if report.get("reconstruction"):
        lines.extend(_reconstruction_summary(report["reconstruction"]))
    if report.get("quantization"):
        lines.append(_quantization_summary(report["quantization"]))
    for which in ("dense", "pruned"):
        ppl = report.get("perplexity", {}).get(which)
        if ppl:
            lines.append(f"  perplexity {which:<7} {ppl['ppl']:.4f} ({ppl['windows']} windows x {ppl['seqlen']} tokens)")
    if report.get("task_evaluation"):
        lines.append("  lm-eval tasks (streamed):")
        lines.extend(format_task_table(report["task_evaluation"]))
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in report["seconds"].items())
    ranks = report.get("ranks", 1)
    lines.append(f"  time: {phases}" + (f" ({ranks} ranks; memory below is rank 0's)" if ranks > 1 else ""))
    plan = report["memory_plan"]
    memory = f"  peak host RSS {format_bytes(report['peak_host_rss_bytes'])} (plan {format_bytes(plan['host']['peak'])})"
    if report["peak_device_bytes"] is not None:
        memory += (f", peak device memory {format_bytes(report['peak_device_bytes'])} reserved "
                   f"(plan {format_bytes(plan['device']['peak'])})")
    lines.append(memory)
    for which, result in report.get("task_evaluation", {}).items():  # lm-eval's imports and each pass's own plan
        for number, done in enumerate(result["passes"]):
            lines.append(f"  task evaluation {which} pass {number + 1}: {done['requests']} requests, peak host RSS "
                         f"{format_bytes(done['peaks']['host'])} (plan {format_bytes(done['plan']['host']['peak'])})")
    return "\n".join(lines)


def _removal_summary(report: dict, removal: dict) -> str:
    removed, influence = removal["removed"], removal["influence"]
    before, after = removal["params_before"], removal["params_after"]
    how = "the closest run by angular distance" if removal["rule"] == "angular distance" else "lowest Block Influence"
    return "\n".join([
        f"offload-prune: {report['method']} removed {len(removed)} of {removal['blocks_before']} blocks -> "
        f"{report.get('save', '')}",
        f"  removed blocks ({how}): {', '.join(map(str, removed))}",
        f"  influence of the removed: {', '.join(f'{influence[i]:.4f}' for i in removed)}; of the kept: "
        f"{min(v for i, v in enumerate(influence) if i not in removed):.4f} and up",
        f"  parameters: {before:,} -> {after:,} ({after / before - 1:+.1%})"])


def _sparsity_summary(report: dict) -> list[str]:
    lines = []
    lines.append(f"  {'modules':<10} {'count':>6} {'weights':>14} {'zeros':>14} {'sparsity':>9}")
    for kind, entry in report["totals"].items():
        lines.append(f"  {kind:<10} {entry['modules']:>6} {entry['numel']:>14,} {entry['zeros']:>14,} "
                     f"{entry['sparsity']:>9.2%}")
    lines.extend(_shortfall(report))
    lines.extend(_rules_summary(report))
    reasons: dict[str, int] = {}
    for stats in report["modules"].values():
        if stats.get("fallback"):
            reasons[stats["fallback"]] = reasons.get(stats["fallback"], 0) + 1
    if reasons:
        lines.append("  pruned by magnitude for lack of calibration statistics: "
                     + ", ".join(f"{count} matrices ({reason})" for reason, count in sorted(reasons.items()))
                     + f"; an expert needs {report['options']['expert_min_tokens']} routed tokens (--expert-min-tokens)")
    if report.get("unpruned"):
        weights = sum(stats["numel"] for stats in report["unpruned"].values())
        lines.append(f"  not pruned: {len(report['unpruned'])} weight matrices in the blocks ({weights:,} weights), "
                     "counted in the totals above")
    layers = report.get("layer_sparsity") or {}
    if layers.get("rule", "uniform") != "uniform":
        ratios = layers["ratios"]
        lines.append(f"  layer sparsity ({layers['rule']}): {min(ratios):.2%} to {max(ratios):.2%} over "
                     f"{len(ratios)} blocks (each block's ratio in report.json)")
    if report.get("nm_valid") is not None:
        lines.append(f"  N:M pattern valid in every module: {report['nm_valid']}")
    return lines


def _rules_summary(report: dict) -> list[str]:
    rules: dict[str, int] = {}
    for stats in report["modules"].values():
        rules[stats.get("rule", "?")] = rules.get(stats.get("rule", "?"), 0) + 1
    return ["  pruned by: " + ", ".join(f"{rule} {count} modules" for rule, count in sorted(rules.items()))]


def _shortfall(report: dict) -> list[str]:
    """Why the pruned matrices' sparsity is not the target, when it is not (by more than 0.05 points)."""
    numel = sum(stats["numel"] for stats in report["modules"].values())
    zeros = sum(stats["zeros"] for stats in report["modules"].values())
    target = report.get("target_sparsity")
    if not numel or target is None or abs(zeros / numel - target) <= 5e-4:
        return []
    reasons = []
    layers = report.get("layer_sparsity") or {}
    mean = layers.get("weighted_mean")
    if layers.get("rule") == "owl" and mean is not None and abs(mean - target) > 5e-4:
        reasons.append(f"OWL's per-block ratios, clipped to within {layers['owl_lambda']} of the target, average "
                       f"{mean:.2%} weighted by each block's weights")
    if report.get("sparsity_type") == "unstructured":
        reasons.append("each row prunes a whole number of weights, its ratio times its inputs rounded down"
                       + (" (OWL's per-block ratios are not multiples of 1/inputs)" if layers.get("rule") == "owl" else ""))
    if zeros / numel > target:
        reasons.append("weights that were zero already count as pruned" +
                       (", and so do kept weights --quantize rounded to zero" if report.get("quantization") else ""))
    return [f"  reached {zeros / numel:.2%} of the pruned matrices' weights against the {target:.2%} target: "
            + "; ".join(reasons)]


def _structured_summary(structured: dict) -> list[str]:
    """Widths and parameters before and after: what a structured run removed."""
    lines = []
    how = "removed (matrices and intermediate size shrunk)" if structured["shrink"] else "zeroed (shapes kept)"
    refit = "refitted by least squares" if structured["neuron_refit"] else "not refitted"
    if structured["widths"]:
        widths = ", ".join(f"{before} -> {after}" for before, after in structured["widths"])
        lines.append(f"  MLP neurons per layer: {widths}, {how}; output matrix {refit}")
    if structured.get("key_value_groups"):
        groups = ", ".join(f"{before} -> {after}" for before, after in structured["key_value_groups"])
        lines.append(f"  attention key/value groups per layer: {groups} (with their query heads), "
                     f"{'removed' if structured['shrink'] else 'zeroed'}; output projection {refit}")
    before, after = structured["params_before"], structured["params_after"]
    lines.append(f"  parameters: {before:,} -> {after:,} ({after / before - 1:+.1%})"
                 + ("" if structured["shrink"] else "; zeroed weights still stored (--shrink removes them)"))
    return lines


def _reconstruction_summary(reconstruction: dict) -> list[str]:
    """How many blocks reconstruction improved, by how much, and why the others kept their pruned weights."""
    blocks = reconstruction["blocks"]
    if not blocks:
        return [f"  reconstruction ({reconstruction['mode']}): no block was pruned"]
    kept = [i for i, entry in blocks.items() if entry["kept"]]
    ratios = sorted(entry["error_after"] / entry["error_before"] for entry in blocks.values() if entry["error_before"])
    seconds = sum(entry["seconds"] for entry in blocks.values())
    lines = [f"  reconstruction ({reconstruction['mode']}, {reconstruction['target']} target, "
             f"{reconstruction['steps']} steps): kept in {len(kept)} of {len(blocks)} blocks, block output error "
             f"x{ratios[len(ratios) // 2]:.3f} (median; from x{ratios[0]:.3f} to x{ratios[-1]:.3f}), {seconds:.1f} s"
             if ratios else f"  reconstruction ({reconstruction['mode']}): the pruned blocks' outputs were exact"]
    fallbacks = {i: entry["fallback"] for i, entry in blocks.items() if entry.get("fallback")}
    if fallbacks:
        lines.append("  reconstruction not kept: " + "; ".join(f"block {i}: {why}" for i, why in fallbacks.items()))
    return lines


def _quantization_summary(quantization: dict) -> str:
    """The scheme, how far the quantized matrices' outputs moved, and the size on disk."""
    group = "per channel" if quantization["group_size"] == -1 else f"groups of {quantization['group_size']}"
    how = (f"{quantization['method']}{', activation order' if quantization['act_order'] else ''}, {group}, "
           f"{'symmetric' if quantization['symmetric'] else 'asymmetric'}")
    errors = quantization["errors"]
    moved = f", output error {errors[len(errors) // 2]:.2e} (median)" if errors else ""
    return (f"  quantized {quantization['scheme']} ({how}): {quantization['matrices']} matrices{moved}; "
            f"{format_bytes(quantization['bytes_before'])} -> {format_bytes(quantization['bytes_after'])} on disk "
            f"({quantization['format']})")
