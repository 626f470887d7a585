"""The CUDA-only branches, reached on the CPU: the meta device catches a tensor made on the wrong device,
and monkeypatched collectives, allocators and flags record what CUDA would get."""
import json
import os

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig

from offload_prune.runtime import activations
from offload_prune.runtime.activations import ActivationStore, may_copy_asynchronously, pinned_bytes
from offload_prune.config import OffloadPruneError, PruneConfig
from offload_prune.runtime.distributed import Ranks
from offload_prune.surgery.heads import HeadGroups
from offload_prune.surgery.layer_sparsity import OutlierCounter
from offload_prune.model.matrices import Matrix
from offload_prune.methods.ria import neuron_row_order
from offload_prune.surgery.neurons import InputMoments, highest, refit_output
from offload_prune.plan.memory import PROCESS_BASELINE_BYTES, compute_dtype, memory_plan, stored_dtype

from conftest import run_cli

GIB = 2**30


# -- 1. torchrun on one machine with several GPUs ------------------------------------------------------------
@pytest.fixture
def recorded_process_group(monkeypatch):
    """dist and torch.cuda as two NCCL ranks would see them on rank 1; the calls, in order."""
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", torch.device(device))))
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    return calls


def test_each_torchrun_rank_is_bound_to_its_own_gpu_before_nccl_starts(recorded_process_group):
    ranks = Ranks.from_environment(torch.device("cuda"))
    own = torch.device("cuda", 1)
    set_device, init = recorded_process_group
    assert set_device == ("set_device", own)  # before the group: object collectives stage on the current GPU
    assert init[:2] == ("init", "nccl") and init[2]["device_id"] == own
    assert ranks.device(torch.device("cuda")) == own and ranks._collective_device() == own


def test_a_gpu_named_by_index_is_refused_for_several_ranks_on_one_machine(recorded_process_group, monkeypatch):
    with pytest.raises(OffloadPruneError, match="names one GPU for the 2 torchrun ranks"):
        Ranks.from_environment(torch.device("cuda", 0))
    assert recorded_process_group == []
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one rank per machine: the GPU it names is its own
    ranks = Ranks.from_environment(torch.device("cuda", 3))
    assert recorded_process_group[0] == ("set_device", torch.device("cuda", 3))
    assert ranks.device(torch.device("cuda", 3)) == torch.device("cuda", 3)


def test_cpu_ranks_join_over_gloo_unbound(recorded_process_group):
    ranks = Ranks.from_environment(torch.device("cpu"))
    assert recorded_process_group == [("init", "gloo", recorded_process_group[0][2])]
    assert ranks.device(torch.device("cpu")) == torch.device("cpu") and ranks._collective_device().type == "cpu"


# -- 2. --ria-permute on a GPU: row orders made on the neurons' device ---------------------------------------
def test_neuron_and_head_row_orders_stay_on_the_device_of_their_indices():
    assert neuron_row_order(torch.arange(8, device="meta"), 16, False).device.type == "meta"
    assert neuron_row_order(torch.arange(8, device="meta"), 16, True).shape == (16,)
    linear = torch.nn.Linear(8, 8, device="meta")
    query = Matrix("attn.q", linear.weight, None, linear, kind="attention")
    output = Matrix("attn.o", linear.weight, None, linear, kind="attention", position="out")
    heads = HeadGroups("attn", [query], output, 2)
    assert heads.rows(query, torch.arange(1, device="meta")).device.type == "meta"
    assert heads.columns(torch.arange(1, device="meta")).device.type == "meta"


# -- 3. the factorisation's squares on CUDA -------------------------------------------------------------------
def test_cuda_plan_counts_the_square_cusolver_holds_in_cholesky_inverse(tmp_path):
    """LLaMA-2-70B, 128 x 2048: on CUDA, cholesky_inverse holds the factor, an identity and the result; the
    plan counts one [cols, cols] square more than LAPACK needs (down_proj's, the widest input), and both
    methods stay under 20 GiB of device memory."""
    llama = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, dtype="float16")
    square = 28672**2 * 4
    for method, squares_on_cpu in (("sparsegpt", 2), ("admm", 3)):
        config = PruneConfig(micro_batch_size=1, model="-", prune_method=method).validate()
        on_gpu = memory_plan(config, llama, "cuda", process_bytes=PROCESS_BASELINE_BYTES)
        on_cpu = memory_plan(config, llama, "cpu", process_bytes=PROCESS_BASELINE_BYTES)
        assert on_cpu["method"]["prune"] < (squares_on_cpu + 1) * square <= on_gpu["method"]["prune"], method
        assert on_gpu["device"]["peak"] <= 20 * GIB, method
        print(f"{method}: device plan {on_gpu['device']['peak'] / GIB:.2f} GiB")


# -- 4. the page-locked cache: rounded by the host allocator, handed back on release ------------------------
def test_a_pinned_cache_is_planned_at_the_size_the_host_allocator_gives_it(tiny_llama):
    config = PruneConfig(micro_batch_size=1, model=str(tiny_llama), nsamples=5, seqlen=48, offload_activations="ram").validate()
    model_config = LlamaConfig.from_pretrained(tiny_llama)
    gpu = memory_plan(config, model_config, "cuda", eval_windows=3)
    cpu = memory_plan(config, model_config, "cpu", eval_windows=3)
    cache = gpu["activation_cache_bytes"]
    assert cache & (cache - 1)  # not a power of two: the rounding shows
    assert gpu["phases"]["prune"]["host_parts"]["activation_cache"] == pinned_bytes(cache) > cache
    assert cpu["phases"]["prune"]["host_parts"]["activation_cache"] == cache
    itemsize = getattr(torch, gpu["compute_dtype"]).itemsize
    assert gpu["phases"]["eval"]["host_parts"]["eval_cache"] == pinned_bytes(3 * 48 * 64 * itemsize)
    assert [pinned_bytes(n) for n in (1, 2, 3, 2**20, 2**20 + 1)] == [1, 2, 4, 2**20, 2**21]


def test_releasing_a_pinned_cache_empties_the_host_allocators_cache(tmp_path, monkeypatch):
    emptied = []
    monkeypatch.setattr(activations, "empty_pinned_cache", lambda: emptied.append(True))
    store = ActivationStore(tmp_path, (2, 4, 8), torch.float32, "ram", torch.device("cuda"))  # not allocated yet
    assert store.pin  # a GPU computes: the cache would be page-locked
    store.tensor = torch.empty(2, 4, 8)
    store.release()
    assert emptied == [True] and store.tensor is None
    store.release()  # nothing held: nothing to hand back
    assert emptied == [True]


# -- 5. the activation cache is gone before the phases planned without it -----------------------------------
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset peak RSS")
def test_the_activation_cache_is_released_before_the_write_phase(checkpoint_factory, tmp_path):
    """A 64 MiB cache beside a small model: held through "write" (as before), that phase measured ~10 %
    over its plan, which leaves the cache out."""
    model = checkpoint_factory(num_layers=2, hidden=256, intermediate=512, heads=4, kv_heads=4)
    save = tmp_path / "out"
    result = run_cli("--model", model, "--save", save, "--calib-data", model / "demo.txt", "--nsamples", 128,
                     "--seqlen", 512, "--eval-ppl", "--eval-data", model / "demo.txt", "--eval-max-windows", 2,
                     "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((save / "report.json").read_text())
    plan, measured = report["memory_plan"], report["phase_peaks"]
    assert plan["activation_cache_bytes"] == 64 * 2**20
    for phase in ("write", "eval_dense", "eval_pruned"):
        planned = plan["phases"]["eval" if phase.startswith("eval") else phase]["host"]
        print(f"{phase}: planned {planned / 2**20:.0f} MiB, measured {measured[phase]['host'] / 2**20:.0f} MiB")
        assert measured[phase]["host"] <= planned * 1.05, phase


# -- 6. FLAP's variance and the refit's centred Gram in float32 ----------------------------------------------
@torch.no_grad()
def test_float32_moments_keep_the_variance_of_quiet_neurons_with_large_means():
    """fp16 activations with means 8-16 and spreads 1e-3 to 1e-1, 262k tokens in micro-batches, summed in
    float32 (a GPU's statistics): the variance and the neurons FLAP keeps are those of float64 sums."""
    torch.manual_seed(0)
    width, tokens = 32, 262_144
    means = torch.linspace(8, 16, width)
    spreads = torch.logspace(-3, -1, width)[torch.randperm(width)]
    x = (means + spreads * torch.randn(tokens, width)).half()
    exact, quick = (InputMoments.empty(width, torch.device("cpu"), dtype) for dtype in (torch.float64, torch.float32))
    for part in x.split(8192):
        exact.add(part, with_gram=True)
        quick.add(part, with_gram=True)
    reference = x.double().var(0, unbiased=False)
    assert torch.allclose(exact.variance, reference, rtol=1e-9)
    assert torch.allclose(quick.variance.double(), reference, rtol=1e-3)
    assert torch.allclose(quick.mean.double(), x.double().mean(0), rtol=1e-6)
    kept = width // 2
    assert torch.equal(highest(quick.variance, kept), highest(reference, kept))
    # The refit's systems: centred (with a bias) and about zero (without), against float64 from the data.
    columns = torch.arange(0, width, 3)
    centred = x.double() - x.double().mean(0)
    assert torch.allclose(quick.gram_columns(columns, True, torch.float64), (centred.T @ centred[:, columns]) / tokens,
                          rtol=1e-3, atol=1e-9)
    about_zero = x.double().T @ x.double()[:, columns]
    assert torch.allclose(quick.gram_columns(columns, False, torch.float64), about_zero, rtol=1e-5)
    weight = torch.randn(6, width)
    refit, shift = refit_output(weight, quick, columns, with_bias=True, percdamp=0.0)
    expected, _ = refit_output(weight, exact, columns, with_bias=True, percdamp=0.0)
    assert torch.allclose(refit, expected, rtol=2e-2, atol=2e-2)


# -- 7. copies from a GPU into pageable memory finish before their bytes are summed --------------------------
def test_only_device_or_page_locked_targets_take_asynchronous_copies(tmp_path):
    store = ActivationStore(tmp_path, (2, 4, 8), torch.float32, "disk")
    mapped = store.create(0)
    assert not may_copy_asynchronously(mapped)  # a memory-mapped file: summed right after the copy
    assert not may_copy_asynchronously(torch.empty(3))
    assert may_copy_asynchronously(torch.empty(3, device="meta"))


# -- 8. OWL's outlier statistics in the device's statistics dtype ---------------------------------------------
def test_owl_sums_squares_in_float32_off_the_cpu():
    counter = OutlierCounter()
    counter.add_batch("m", torch.ones(2, 3, 4, device="meta", dtype=torch.float16), None)
    assert counter.sum_squares["m"].dtype == torch.float32  # no float64 copy of a micro-batch on a GPU
    counter.add_batch("c", torch.ones(2, 3, 4), None)
    assert counter.sum_squares["c"].dtype == torch.float64


# -- 9. the TF32 guard, whichever API the process set TF32 with ---------------------------------------------
def _tf32_state() -> tuple:
    """What cuBLAS and cuDNN read, through the API that reads in this process."""
    try:
        return "legacy", torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, \
            torch.backends.cudnn.allow_tf32
    except RuntimeError:
        return "new", torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision


@pytest.mark.parametrize("enable", [
    "torch.set_float32_matmul_precision('high')", "torch.backends.cuda.matmul.allow_tf32 = True",
    "torch.backends.cuda.matmul.fp32_precision = 'tf32'", "None"])
def test_no_tf32_reads_and_restores_the_flags_through_the_api_in_use(enable):
    """In a fresh process (the flags are process-wide): inside the guard TF32 is off as cuBLAS reads it, and
    nothing raises; after it, the flags are as before."""
    import subprocess
    import sys
    code = (f"import torch\nfrom offload_prune.runtime.hessian_sums import no_tf32\nimport test_cuda_standins as t\n{enable}\n"
            "before = t._tf32_state()\nwith no_tf32():\n    inside = t._tf32_state()\n"
            "torch.randn(4, 4) @ torch.randn(4, 4)\nprint(repr((before, inside, t._tf32_state())))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stderr
    before, inside, after = eval(result.stdout.strip().splitlines()[-1])
    assert after == before and inside[0] == before[0]
    assert inside[1:] == (("highest", False, False) if inside[0] == "legacy" else ("ieee", "ieee"))


# -- 10. the plan and the run choose one compute dtype -------------------------------------------------------
def test_plan_and_run_take_the_stored_dtype_from_the_shards_when_config_json_disagrees(checkpoint_factory, tmp_path,
                                                                                        capsys):
    import shutil

    from offload_prune.disk.checkpoint import CheckpointReader
    from offload_prune.cli import main
    from offload_prune.plan.memory import pick_dtype
    model = tmp_path / "model"
    shutil.copytree(checkpoint_factory(num_layers=2, hidden=64, intermediate=128, dtype=torch.bfloat16), model)
    settings = json.loads((model / "config.json").read_text())
    settings["dtype"] = "float32"  # config.json saying one thing, the shards another
    (model / "config.json").write_text(json.dumps(settings))
    reader = CheckpointReader(str(model))
    assert stored_dtype(reader.config) == torch.float32
    run = pick_dtype("auto", torch.device("cuda"), reader)
    assert run == torch.bfloat16 == compute_dtype("auto", "cuda", stored_dtype(reader.config, reader.dtypes.values()))
    plan = memory_plan(PruneConfig(micro_batch_size=1, model=str(model)).validate(), reader.config, "cuda",
                       shard_dtypes=reader.dtypes.values())
    assert plan["compute_dtype"] == "bfloat16"
    assert main(["plan", "--model", str(model), "--device", "cuda", "--nsamples", "4", "--seqlen", "32"]) == 0
    assert "in bfloat16 (stored bfloat16)" in capsys.readouterr().out
