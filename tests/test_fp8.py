"""Block-scaled FP8 checkpoints (DeepSeek-V3's format): read as transformers dequantizes them, pruned, and
written back as FP8 with fresh block scales (or bfloat16 on request); refused in one line when the scales
are not the layout config.json names."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import quick_args, read_all_tensors, run_cli
from offload_prune.demo import make_checkpoint
from offload_prune.disk.checkpoint import CheckpointReader

BLOCK = 32
FP8_MAX = 448.0


def to_fp8(folder: Path, block: int = BLOCK, drop_scale: str | None = None, scale_rows: int | None = None) -> Path:
    """Every 2-D weight of the blocks as float8_e4m3 with one float32 scale per block x block tile (amax / 448),
    as DeepSeek-V3 ships them; config.json gets the fp8 quantization_config."""
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        out = {}
        for name, weight in tensors.items():
            if ".layers." not in name or weight.dim() != 2:
                out[name] = weight
                continue
            rows, cols = weight.shape
            tiles = weight.float().reshape(rows // block, block, cols // block, block)
            scale = tiles.abs().amax(dim=(1, 3)) / FP8_MAX
            out[name] = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(rows, cols)
            if name != drop_scale:
                out[name[:-len("weight")] + "weight_scale_inv"] = scale[:scale_rows] if scale_rows else scale
        save_file(out, shard, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {n: f for shard in sorted(folder.glob("*.safetensors")) for n in load_file(shard)
                          for f in [shard.name]}
    index.write_text(json.dumps(data))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory) -> Path:
    folder = make_checkpoint(tmp_path_factory.mktemp("fp8"), num_layers=2, hidden=128, intermediate=256,
                             dtype=torch.bfloat16, max_shard_size="100KB")
    return to_fp8(folder)


def transformers_weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)  # no GPU: transformers dequantizes to bfloat16
    return {name: tensor for name, tensor in model.state_dict().items()}


def test_fp8_weights_read_as_transformers_dequantizes_them(fp8_model):
    reader = CheckpointReader(str(fp8_model))
    assert not any(name.endswith("weight_scale_inv") for name in reader.weight_map)
    expected = transformers_weights(fp8_model)
    name = "model.layers.1.mlp.down_proj.weight"
    assert reader.dtypes[name] == torch.bfloat16 and reader.shapes[name] == (128, 256)
    for name in [n for n in reader.weight_map if ".layers." in n]:
        assert torch.equal(reader.read([name])[name], expected[name]), name


def fp8_weight_names(folder: Path) -> list[str]:
    return [name for name, tensor in read_all_tensors(folder).items() if tensor.dtype == torch.float8_e4m3fn]


def test_pruned_fp8_written_back_as_fp8_and_reloaded(fp8_model, tmp_path):
    save, dense = tmp_path / "fp8", tmp_path / "bf16"
    for folder, extra in ((save, ()), (dense, ("--output-dtype", "bfloat16"))):
        done = run_cli(*quick_args(fp8_model, folder, "--prune_method", "sparsegpt", *extra))
        assert done.returncode == 0, done.stderr
    written = read_all_tensors(save)
    assert sorted(fp8_weight_names(save)) == sorted(fp8_weight_names(fp8_model))
    assert json.loads((save / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    assert not fp8_weight_names(dense)
    reloaded, reference = transformers_weights(save), transformers_weights(dense)
    bf16 = read_all_tensors(dense)
    worst = 0.0
    for name in fp8_weight_names(fp8_model):
        scale = written[name[:-len("weight")] + "weight_scale_inv"]
        assert scale.shape == (math.ceil(bf16[name].shape[0] / BLOCK), math.ceil(bf16[name].shape[1] / BLOCK))
        assert torch.equal(reference[name], bf16[name])
        # Pruned weights stay exactly zero through the FP8 round trip, and nothing else becomes zero here.
        assert torch.equal(reloaded[name] == 0, bf16[name] == 0), name
        assert (reloaded[name] == 0).float().mean() >= 0.5
        tiles = bf16[name].float().reshape(-1, BLOCK, bf16[name].shape[1] // BLOCK, BLOCK)
        error = (reloaded[name].float() - bf16[name].float()).reshape(tiles.shape).abs().amax(dim=(1, 3))
        worst = max(worst, float((error / tiles.abs().amax(dim=(1, 3))).max()))
    # e4m3 keeps 3 mantissa bits: at most half a step, 1/16 of the block's largest magnitude at the top.
    assert worst <= 1 / 16, worst
    print(f"largest FP8 re-quantization error, relative to its block's largest weight: {worst:.4f}")
    report = json.loads((save / "report.json").read_text())
    assert report["totals"]["all"]["sparsity"] >= 0.5


def test_fp8_layouts_that_are_not_read_are_refused(tmp_path):
    cases = {"missing": dict(drop_scale="model.layers.0.self_attn.q_proj.weight"), "shape": dict(scale_rows=2)}
    messages = {"missing": "model.layers.0.self_attn.q_proj.weight is stored as float8_e4m3 without its weight_scale_inv",
                "shape": "not the 32x32 block scales config.json names"}
    for case, options in cases.items():
        folder = to_fp8(make_checkpoint(tmp_path / case, num_layers=1, hidden=128, intermediate=256,
                                        dtype=torch.bfloat16), **options)
        done = run_cli(*quick_args(folder, tmp_path / f"out-{case}"))
        assert done.returncode == 2 and messages[case] in done.stderr, done.stderr
        assert not (tmp_path / f"out-{case}").exists()
    plain = make_checkpoint(tmp_path / "plain", num_layers=1, hidden=64, intermediate=128)
    done = run_cli(*quick_args(plain, tmp_path / "out-plain", "--output-dtype", "bfloat16"))
    assert done.returncode == 2 and "converts an FP8 checkpoint's weights" in done.stderr, done.stderr


def test_weights_not_a_multiple_of_the_block_use_the_partial_blocks_scale():
    """DeepSeek-V3's kv_a_proj_with_mqa has 576 rows, 4.5 blocks of 128: its scales have 5 rows, the last for
    the half block. Read as transformers' FP8 layers dequantize it (their backward's dequantization), and
    quantized back with the same grid."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    from offload_prune.disk.fp8 import BlockFP8Weights
    fp8 = BlockFP8Weights({"weight_block_size": [128, 128]}, {}, {}, torch.bfloat16)
    weight = torch.randn(576, 300)
    quantized, scales = fp8.quantize(weight)
    assert quantized.shape == (576, 300) and scales.shape == (5, 3)
    dense = fp8.convert({"weight": quantized, "weight_scale_inv": scales})
    assert torch.equal(dense, _dequantize_fp8_weight(quantized, scales, [128, 128], torch.float32).to(torch.bfloat16))
    assert (dense.float() - weight).abs().max() <= scales.max() * 32  # within half an FP8 step at the top
