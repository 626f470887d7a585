"""What a run writes besides the blocks: the shard layout of the output, the tensors outside the
blocks (copied, or the pruned head), the index, config.json and the tokenizer's files."""
from __future__ import annotations

import json
import math

import torch
from safetensors import safe_open
from torch import nn

from ..config import OffloadPruneError, PruneConfig
from ..disk import durable
from ..disk.checkpoint import INDEX_NAME, CheckpointReader, ShardLayout, side_files
from ..disk.fp8 import SCALE, BlockFP8Weights
from ..model.lm_head import LmHead
from ..model.matrices import find_matrices
from ..quantize.checkpoint import quantization_config, quantized_matrices, stored_layout
from ..quantize.grid import Grid
from ..model.skeleton import StreamedModel, build_skeleton
from ..surgery.block_removal import check_blocks_expressed, config_without_blocks, renumbered
from .passes import Run
from .report import module_stats


def fp8_written(reader: CheckpointReader, config: PruneConfig) -> BlockFP8Weights | None:
    """An FP8 checkpoint's FP8 weights, when they are written back as FP8 (--output-dtype auto, no --quantize)."""
    return reader.fp8 if config.output_dtype == "auto" and config.quantize == "off" else None


def fp8_stored(fp8: BlockFP8Weights | None, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` as written: each FP8 weight of the input quantized back, beside its fresh block scales."""
    if fp8 is None:
        return tensors
    out = {}
    for name, tensor in tensors.items():
        if name in fp8.parts:
            out[name], out[fp8.parts[name][SCALE]] = fp8.quantize(tensor)
        else:
            out[name] = tensor
    return out


def write_kept_block(run: Run, old: int, new: int, tensors: dict[str, torch.Tensor]) -> dict:
    """Block `old`'s tensors written as the output's block `new` (renamed, FP8 kept as the output stores
    it); returns the unit's output records for the commit."""
    stored = fp8_stored(fp8_written(run.reader, run.config), tensors)
    return run.layout.write_unit(1 + new, run.state.save,
                                 {renumbered(name, old, new): tensor for name, tensor in stored.items()})


def output_layout(streamed: StreamedModel, head: LmHead | None, kept: list[int] | None = None,
                  grid: Grid | None = None, fp8: BlockFP8Weights | None = None,
                  expert_groups: dict[int, list[list[str]]] | None = None) -> ShardLayout:
    """Unit 0: the tensors outside the blocks; unit 1 + j: output block j (input block kept[j], all by
    default), under its new number; with a quantization `grid`, each block's Linear weights as their
    packed parts (sized as at most what they will take); with `fp8`, each FP8 weight beside its scales.
    `expert_groups` (block: checkpoint names of each expert group) takes each group out of its block into
    a unit of its own, after all the blocks (`layout.group_units[block]`), written as the group is pruned."""
    reader = streamed.reader
    nbytes = {n: reader.nbytes(n) for n in streamed.outside_names}
    outside_names = list(streamed.outside_names)
    if head and head.name not in reader.weight_map:  # tied: the pruned head becomes a tensor of its own
        outside_names.append(head.name)
        nbytes[head.name] = reader.nbytes(head.source)
    units, group_units = [outside_names], []
    for new, old in enumerate(range(streamed.num_layers) if kept is None else kept):
        names = {renumbered(n, old, new) if new != old else n: n for n in streamed.block_names(old)}
        nbytes.update({name: reader.nbytes(source) for name, source in names.items()})
        if grid is not None:
            for weight, parts in packed_parts(streamed, old, grid).items():
                del names[weight], nbytes[weight]
                names.update(dict.fromkeys(parts))
                nbytes.update(parts)
        groups = (expert_groups or {}).get(old, [])
        in_groups = {name for group in groups for name in group}
        block_units = [[n for n in names if n not in in_groups], *groups]
        for unit in block_units if fp8 is not None else ():
            for name in list(unit):
                if names[name] in fp8.parts:
                    scale = name[:-len("weight")] + SCALE
                    unit.append(scale)
                    nbytes[name] = math.prod(reader.shapes[names[name]])
                    nbytes[scale] = math.prod(fp8.grid(reader.shapes[names[name]])) * 4
        units.append(block_units[0])
        group_units.append((old, block_units[1:]))
    layout_units = list(units)
    numbers: dict[int, list[int]] = {}
    for old, groups in group_units:
        numbers[old] = list(range(len(layout_units), len(layout_units) + len(groups)))
        layout_units += groups
    layout = ShardLayout(layout_units, nbytes, reader.max_shard_bytes())
    layout.group_units = numbers
    return layout


def read_written(run: Run, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors this run has written (under the input's names), read back from the output folder as the
    input's reader reads them: FP8 weights dense, beside no scale."""
    fp8, files = fp8_written(run.reader, run.config), run.layout.weight_map()
    wanted = {}  # (input name, part) -> the name written
    for name in names:
        for part in (fp8.parts[name] if fp8 is not None and name in fp8.parts else {"weight": name}):
            wanted[name, part] = name[:-len("weight")] + part if part != "weight" else name
    by_file: dict[str, list[tuple[str, str]]] = {}
    for key, written in wanted.items():
        by_file.setdefault(files[written], []).append(key)
    stored: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for file, keys in by_file.items():  # each shard opened once
        with safe_open(run.state.save / file, framework="pt", device="cpu") as handle:
            for name, part in keys:
                stored[name][part] = handle.get_tensor(wanted[name, part])
    return {name: fp8.convert(parts) if len(parts) > 1 else parts["weight"] for name, parts in stored.items()}


def packed_parts(streamed: StreamedModel, index: int, grid: Grid) -> dict[str, dict[str, int]]:
    """{checkpoint weight name: {part name: at most its bytes}} of block `index`'s quantized Linears."""
    prefix = streamed.block_prefix(index)
    found = {}
    for name, m in quantized_matrices(find_matrices(streamed.layers[index])).items():
        grid.check_columns(name, m.in_features)
        source = streamed.checkpoint_name(prefix + name + ".weight")
        if source is None:
            raise OffloadPruneError(f"--quantize: {prefix}{name}.weight is not stored as one tensor of its own")
        scale_dtype = streamed.reader.dtypes[source]
        found[source] = {source[:-len("weight")] + part: math.prod(shape) * dtype.itemsize
                         for part, (shape, dtype) in stored_layout(tuple(m.weight.shape), scale_dtype, grid).items()}
    return found


def linear_layers_outside(streamed: StreamedModel) -> list[str]:
    """Linear layers outside the blocks (the head): left in 16 bits, named in the quantization config."""
    return [name for name, module in streamed.model.named_modules()
            if isinstance(module, nn.Linear) and not name.startswith(streamed.layers_path + ".")]


def write_outside(run: Run) -> None:
    """Tensors outside the blocks (copied, or the pruned head), index, config/tokenizer files."""
    reader, head, state = run.reader, run.head, run.state
    outside = reader.read(run.streamed.outside_names)
    modules = dict(state.modules)
    if head:
        outside[head.name] = head.prune(reader.read([head.source])[head.source], run.config, run.device)
        modules[head.name] = {**module_stats(outside[head.name], run.config.nm), "rule": "magnitude",
                              "kind": "lm_head"}
    outputs = run.layout.write_unit(0, state.save, fp8_stored(fp8_written(reader, run.config), outside))
    _, total_bytes = run.layout.written_totals(state.save)
    outputs[INDEX_NAME] = durable.write_text(state.save / INDEX_NAME, run.layout.index_text(total_bytes))
    for path in side_files(reader.folder):
        if path.name == "config.json" and (head and head.name != head.source or run.method.removes_blocks
                                           or run.config_changes or run.config.quantize != "off"
                                           or reader.converted is not None):
            text = json.dumps(output_config(run, state.manifest["removed_blocks"]), indent=2) + "\n"
            outputs[path.name] = durable.write_text(state.save / path.name, text)
        else:
            outputs[path.name] = durable.copy_file(path, state.save / path.name)
    state.commit(outputs=outputs, stage=run.streamed.num_layers, run_files={}, finalized=True, modules=modules)


def output_config(run: Run, removed: list[int] | None) -> dict:
    """config.json of the output: the head untied when it was pruned apart from a tied embedding; the
    blocks that remain, when blocks were removed (checked against what transformers builds from it)."""
    config = json.loads((run.reader.folder / "config.json").read_text())
    if run.head and run.head.name != run.head.source:
        config["tie_word_embeddings"] = False
    if removed:
        kept = [i for i in range(run.streamed.num_layers) if i not in set(removed)]
        edited = config_without_blocks(config, run.reader.config, kept)
        _, _, new_layers = build_skeleton(type(run.reader.config).from_dict(edited))
        check_blocks_expressed(run.streamed.layers, new_layers, kept,
                               [k for k in edited if k != "num_hidden_layers" and edited[k] != config.get(k)])
        config = edited
    if fp8_written(run.reader, run.config) is None:  # a quantized input is read dense, and written dense...
        config.pop("quantization_config", None)
    if run.config.quantize != "off":  # ...unless the output is quantized
        config["quantization_config"] = quantization_config(Grid.of(run.config), linear_layers_outside(run.streamed))
    return {**config, **run.config_changes}
