"""What a run keeps on disk to resume after a crash, and the rules for reusing an output folder.

Per finished block, in this order: its output shards, the next block's input activations, then
the manifest saying the block is done. Each write is a temp file renamed into place, so a kill
at any instant leaves either the old or the new state, never a mix.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .checkpoint import atomic_write_text
from .config import OffloadPruneError

RUN_DIR = ".offload-prune-run"


class RunState:
    def __init__(self, save: Path, fingerprint: dict, manifest: dict):
        self.save, self.fingerprint, self.manifest = save, fingerprint, manifest
        self.dir = save / RUN_DIR

    @property
    def completed_blocks(self) -> int:
        return self.manifest["completed_blocks"]

    @property
    def modules(self) -> dict[str, dict]:
        return self.manifest["modules"]

    @classmethod
    def prepare(cls, save: Path, input_folder: Path, fingerprint: dict, overwrite: bool,
                resume: bool) -> "RunState":
        """Start a new run in `save`, or pick up the unfinished one there if it is the same run."""
        _refuse_unsafe_output(save, input_folder)
        manifest_path = save / RUN_DIR / "manifest.json"
        if manifest_path.is_file() and not overwrite:
            manifest = json.loads(manifest_path.read_text())
            differences = _differences(manifest["fingerprint"], fingerprint)
            if differences:
                raise OffloadPruneError(f"--save {save} holds an unfinished run of a different job "
                                        f"({'; '.join(differences[:3])}); pass --overwrite to start over")
            for stray in [*save.glob("*.tmp"), *(save / RUN_DIR).glob("*.tmp")]:
                stray.unlink()  # half-written files of the killed run
            return cls(save, fingerprint, manifest)
        if resume and not overwrite:
            raise OffloadPruneError(f"--resume: {save} holds no unfinished run")
        if save.exists() and any(save.iterdir()):
            if not overwrite:
                raise OffloadPruneError(f"--save {save} is not empty; pass --overwrite to replace its contents")
            shutil.rmtree(save)
        (save / RUN_DIR).mkdir(parents=True, exist_ok=True)
        state = cls(save, fingerprint, {"fingerprint": fingerprint, "completed_blocks": 0,
                                        "captured": False, "modules": {}})
        return state

    def commit(self, **changes) -> None:
        self.manifest.update(changes)
        atomic_write_text(self.dir / "manifest.json", json.dumps(self.manifest, indent=1, default=str))

    def save_layer_kwargs(self, kwargs: list[dict]) -> None:
        tmp = self.dir / "layer_kwargs.pt.tmp"
        torch.save(kwargs, tmp)
        os.replace(tmp, self.dir / "layer_kwargs.pt")

    def load_layer_kwargs(self) -> list[dict]:
        return torch.load(self.dir / "layer_kwargs.pt", weights_only=False)

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _refuse_unsafe_output(save: Path, input_folder: Path) -> None:
    save, source = save.resolve(), input_folder.resolve()
    if save == source or source in save.parents:
        raise OffloadPruneError(f"--save {save} is (inside) the input model folder, which is never written to")
    if save in source.parents:
        raise OffloadPruneError(f"--save {save} contains the input model folder; choose another folder")


def _differences(old: dict, new: dict, path: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{path}{key}.")
        elif json.dumps(a, default=str) != json.dumps(b, default=str):
            out.append(f"{path}{key}: {a} then, {b} now")
    return out
