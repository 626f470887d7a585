import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from offload_prune.demo import make_checkpoint

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Builds (once per distinct set of arguments) a small random checkpoint saved sharded."""
    cache: dict = {}

    def build(**kwargs) -> Path:
        key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in cache:
            folder = tmp_path_factory.mktemp(kwargs.get("arch", "llama"))
            cache[key] = make_checkpoint(folder, **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_llama(checkpoint_factory):
    return checkpoint_factory(num_layers=3, hidden=64, intermediate=128)


def run_cli(*args, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "offload_prune", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def quick_args(model: Path, save: Path, *extra) -> list[str]:
    """A few-second prune of a test checkpoint on its own demo text."""
    return [str(a) for a in ("--model", model, "--save", save, "--calib-data", model / "demo.txt",
                             "--nsamples", 4, "--seqlen", 32, "--quiet", *extra)]


def folder_digests(folder: Path, skip=("report.json",)) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.name not in skip}


def read_all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


class CrashWorker:
    """Client of crash_worker.py: each `run` is a fresh offload-prune command in ~0.2 s."""

    def __init__(self, warm_up_argv: list, folder: Path):
        self.folder = folder
        self.numbers = itertools.count()
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("crash_worker.py")),
                                         json.dumps([str(a) for a in warm_up_argv])],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, *argv, env=None, cwd=None, fsize_limit=None) -> tuple[int, str]:
        """(exit code or -signal, what the command printed)."""
        output = self.folder / f"output-{next(self.numbers)}.txt"
        request = {"argv": [str(a) for a in argv], "env": env or {}, "cwd": str(cwd) if cwd else None,
                   "fsize_limit": fsize_limit, "output": str(output)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        code = json.loads(self.process.stdout.readline())["code"]
        return code, output.read_text()

    def steps(self, *argv) -> list[str]:
        """The filesystem steps an uninterrupted run takes, as 'kind path' lines."""
        log = self.folder / f"steps-{next(self.numbers)}.log"
        code, printed = self.run(*argv, env={"OFFLOAD_PRUNE_STEP_LOG": str(log)})
        assert code == 0, printed
        return [line.split(" ", 1)[1] for line in log.read_text().splitlines()]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def with_quiet_blocks(model, folder, blocks, scale=0.2):
    """A copy of `model` whose `blocks` barely change the hidden states (their output projections scaled
    down): the blocks ShortGPT removes, with kept blocks on both sides of them."""
    shutil.copytree(model, folder)
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in tensors:
            if any(f"layers.{b}." in name for b in blocks) and name.endswith(("o_proj.weight", "down_proj.weight")):
                tensors[name] = tensors[name] * scale
        save_file(tensors, shard, metadata={"format": "pt"})
    return folder
