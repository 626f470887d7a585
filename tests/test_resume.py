"""A run killed anywhere and resumed writes files identical to an uninterrupted run."""
import pytest

from conftest import folder_digests, run_cli

KILL_POINTS = ["block-done:0", "block-start:1", "block-pruned:1", "writing:1", "finalize"]


@pytest.fixture(scope="module")
def resume_model(checkpoint_factory):
    # Shards of ~40 KB split every block over several files, so "writing" lands mid-block.
    return checkpoint_factory(num_layers=3, hidden=64, intermediate=128, max_shard_size="40KB")


def prune_args(model, save, *extra):
    return ["--model", model, "--save", save, "--prune_method", "wanda", "--calib-data", model / "demo.txt",
            "--nsamples", 4, "--seqlen", 32, "--quiet", *extra]


@pytest.fixture(scope="module")
def uninterrupted(resume_model, tmp_path_factory):
    save = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = run_cli(*prune_args(resume_model, save))
    assert result.returncode == 0, result.stderr
    return folder_digests(save)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_then_resume_is_identical(resume_model, uninterrupted, tmp_path, point):
    save = tmp_path / "out"
    killed = run_cli(*prune_args(resume_model, save), env_extra={"OFFLOAD_PRUNE_KILL_AT": point})
    assert killed.returncode == -9, killed.stderr
    (save / "model-00099-of-00099.safetensors.tmp").write_bytes(b"half a shard")  # as a kill mid-write leaves
    resumed = run_cli(*prune_args(resume_model, save))
    assert resumed.returncode == 0, resumed.stderr
    assert folder_digests(save) == uninterrupted


def test_ctrl_c_stops_at_a_resumable_point(resume_model, uninterrupted, tmp_path):
    save = tmp_path / "out"
    stopped = run_cli(*prune_args(resume_model, save),
                      env_extra={"OFFLOAD_PRUNE_KILL_AT": "block-pruned:1", "OFFLOAD_PRUNE_KILL_SIGNAL": "INT"})
    assert stopped.returncode == 130
    assert "resume" in stopped.stderr and "Traceback" not in stopped.stderr
    resumed = run_cli(*prune_args(resume_model, save, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert folder_digests(save) == uninterrupted


def test_disk_activations_resume(resume_model, uninterrupted, tmp_path):
    save = tmp_path / "out"
    args = prune_args(resume_model, save, "--offload-activations", "disk")
    assert run_cli(*args, env_extra={"OFFLOAD_PRUNE_KILL_AT": "block-pruned:1"}).returncode == -9
    assert run_cli(*args).returncode == 0
    assert folder_digests(save) == uninterrupted


def test_resume_with_other_options_is_refused(resume_model, tmp_path):
    save = tmp_path / "out"
    assert run_cli(*prune_args(resume_model, save), env_extra={"OFFLOAD_PRUNE_KILL_AT": "block-done:0"}).returncode == -9
    refused = run_cli(*prune_args(resume_model, save, "--sparsity_ratio", "0.6"))
    assert refused.returncode == 2
    assert "sparsity_ratio: 0.5 then, 0.6 now" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
