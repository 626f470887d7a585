"""Bad input is refused with one clear line and a non-zero exit, and the input is never touched."""
import shutil

import pytest
from transformers import T5Config, T5ForConditionalGeneration

from offload_prune.cli import main

from conftest import folder_digests


@pytest.fixture
def model_copy(tiny_llama, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    return folder


def refuse(capsys, *args) -> str:
    capsys.readouterr()  # drop what the test's own setup printed
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert err.startswith("offload-prune: error: ")
    return err


def base_args(model, save):
    return ["--model", model, "--save", save, "--calib-data", model / "demo.txt", "--nsamples", 2,
            "--seqlen", 16, "--quiet"]


def test_missing_model_folder(capsys, tmp_path):
    assert "no such folder" in refuse(capsys, "--model", tmp_path / "nope", "--save", tmp_path / "o")


def test_truncated_shard(capsys, model_copy, tmp_path):
    shard = sorted(model_copy.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    before = folder_digests(model_copy)
    assert "unreadable safetensors shard" in refuse(capsys, *base_args(model_copy, tmp_path / "o"))
    assert folder_digests(model_copy) == before


def test_missing_shard(capsys, model_copy, tmp_path):
    sorted(model_copy.glob("*.safetensors"))[2].unlink()
    assert "is missing" in refuse(capsys, *base_args(model_copy, tmp_path / "o"))


def test_unsupported_architecture(capsys, tmp_path):
    folder = tmp_path / "t5"  # encoder-decoder: transformers has no causal-LM class for it
    T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                                        vocab_size=100)).save_pretrained(folder)
    message = refuse(capsys, "--model", folder, "--save", tmp_path / "o", "--calib-data", folder / "config.json")
    assert "unsupported architecture" in message


@pytest.mark.parametrize("flags, words", [
    (["--sparsity_ratio", "1.0"], "[0, 1)"),
    (["--sparsity_ratio", "-0.1"], "[0, 1)"),
    (["--sparsity_type", "4:2"], "0 < N < M"),
    (["--sparsity_type", "2:2"], "0 < N < M"),
    (["--sparsity_type", "half"], "N:M"),
    (["--prune_method", "obs"], "invalid choice"),
    (["--nsamples", "0"], ">= 1"),
    (["--micro-batch-size", "0"], "auto or a number >= 1"),
    (["--micro-batch-size", "many"], "--micro-batch-size"),
    (["--eval-ppl"], "--eval-data"),
])
def test_bad_flags(capsys, model_copy, tmp_path, flags, words):
    before = folder_digests(model_copy)
    assert words in refuse(capsys, *base_args(model_copy, tmp_path / "o"), *flags)
    assert folder_digests(model_copy) == before
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_must_not_touch_input(capsys, model_copy, where):
    save = {"same": model_copy, "inside": model_copy / "pruned", "parent": model_copy.parent}[where]
    before = folder_digests(model_copy)
    assert "input model folder" in refuse(capsys, *base_args(model_copy, save))
    assert folder_digests(model_copy) == before
    assert not (model_copy / "pruned").exists()


def test_non_empty_output_needs_overwrite(capsys, tiny_llama, tmp_path):
    save = tmp_path / "o"
    save.mkdir()
    (save / "precious.txt").write_text("keep me")
    assert "--overwrite" in refuse(capsys, *base_args(tiny_llama, save))
    assert (save / "precious.txt").read_text() == "keep me"
    assert main([str(a) for a in base_args(tiny_llama, save)] + ["--overwrite"]) == 0
    assert not (save / "precious.txt").exists()


def test_too_little_calibration_text(capsys, tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    args = base_args(tiny_llama, tmp_path / "o")
    args[args.index("--calib-data") + 1] = short
    assert "calibration text has 9 tokens" in refuse(capsys, *args)


def test_hub_id_without_network_is_one_clear_line(tmp_path):
    from conftest import run_cli
    result = run_cli("--model", "no-such-org/no-such-model", "--save", tmp_path / "o",
                     env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("offload-prune: error: --model no-such-org/no-such-model: "
                                            "not a local folder and the hub download failed")
    assert len(result.stderr.strip().splitlines()) == 1


def test_nm_with_a_blocksize_that_splits_groups(capsys, tiny_llama, tmp_path):
    message = refuse(capsys, *base_args(tiny_llama, tmp_path / "o"), "--prune_method", "sparsegpt",
                     "--sparsity_type", "2:4", "--blocksize", "6")
    assert "--blocksize 6 must be a multiple of M=4" in message
    assert not (tmp_path / "o").exists()


def test_save_pointing_at_a_file(capsys, tiny_llama, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    assert "is a file" in refuse(capsys, *base_args(tiny_llama, target))
    assert target.read_text() == "mine"


def test_seqlen_beyond_learned_positions(capsys, tmp_path):
    """OPT has a learned position table (with an offset of 2): more positions cannot be encoded."""
    from transformers import OPTConfig, OPTForCausalLM

    from offload_prune.demo import byte_tokenizer, demo_text
    folder = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                             vocab_size=260, max_position_embeddings=64, word_embed_proj_dim=32)).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    (folder / "demo.txt").write_text(demo_text())
    message = refuse(capsys, "--model", folder, "--save", tmp_path / "o", "--calib-data", folder / "demo.txt",
                     "--seqlen", 100)
    assert "--seqlen 100 is more than the 64 positions OPTForCausalLM has learned position embeddings for" in message
    assert not (tmp_path / "o").exists()
