"""What a run keeps on disk to resume after a crash, and the rules for reusing an output folder.

The manifest (`.offload-prune-run/manifest.json`) is the only record of progress. It names every
file the run has committed, with the size and CRC-32 the file had when it was written:

- outputs (in the output folder), each tagged with the stage that wrote it: block i's shards
  stage i, the tensors outside the blocks, index and config/tokenizer files stage `num_layers`,
  report.json stage `num_layers + 1`;
- run files (in the run folder): the input activations of the next block and each decoder
  layer's keyword arguments.

A stage commits by writing its files under new names (write, fsync, rename, fsync the folder),
then replacing the manifest the same way, and only then deleting the run files the new manifest
no longer names. A crash at any instant leaves the old manifest with all its files, or the new
one with all of its. On resume every named file is checked; a missing or damaged one sends the
run back to the last stage whose files are intact, which recomputes the same result.

One process at a time: the output folder is locked with flock, which the OS releases when the
process dies, so a killed run never leaves a stale lock.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

from ..config import OffloadPruneError
from . import durable

RUN_DIR = ".offload-prune-run"
MANIFEST = "manifest.json"


def _fresh(fingerprint: dict) -> dict:
    return {"fingerprint": fingerprint, "captured": False, "outliers": [], "layer_sparsity": None,
            "influence": [], "removed_blocks": None,
            "completed_blocks": 0, "finalized": False, "finished": False, "outputs": {}, "run_files": {},
            "modules": {}, "unpruned": {}}


class RunState:
    def __init__(self, save: Path, manifest: dict, lock_fd: int, num_layers: int):
        self.save, self.manifest, self.num_layers = save, manifest, num_layers
        self.dir = save / RUN_DIR
        self._lock_fd = lock_fd

    @property
    def completed_blocks(self) -> int:
        return self.manifest["completed_blocks"]

    @property
    def modules(self) -> dict[str, dict]:
        return self.manifest["modules"]

    @property
    def started(self) -> bool:
        m = self.manifest
        return (m["captured"] or bool(m["outliers"]) or m["layer_sparsity"] is not None or bool(m["influence"])
                or m["removed_blocks"] is not None)

    @classmethod
    def prepare(cls, save: Path, input_folder: Path, fingerprint: dict, num_layers: int, overwrite: bool,
                resume: bool, what: str = "--save") -> "RunState":
        """Lock `save`; start a new run there, or pick up the run it holds if it is the same job. `what`: how
        messages name the folder."""
        save = save.expanduser().absolute()
        _refuse_unsafe_output(save, input_folder)
        manifest_path = save / RUN_DIR / MANIFEST
        if resume and not overwrite and not manifest_path.is_file():
            raise OffloadPruneError(f"--resume: {save} holds no unfinished run")
        if not save.exists():
            durable.make_dir(save)
        lock_fd = _lock(save, what)
        try:
            if manifest_path.is_file() and not overwrite:
                manifest = _read_manifest(manifest_path)
                if manifest is not None:
                    differences = _differences(manifest["fingerprint"], fingerprint)
                    if differences:
                        held = "the finished output" if manifest["finished"] else "an unfinished run"
                        raise OffloadPruneError(f"--save {save} holds {held} of a different job "
                                                f"({'; '.join(differences[:3])}); pass --overwrite to start over")
                    state = cls(save, manifest, lock_fd, num_layers)
                    state._clean_strays()
                    state._roll_back_to_intact()
                    return state
            if _holds_anything(save) and not overwrite:
                raise OffloadPruneError(f"--save {save} is not empty; pass --overwrite to replace its contents")
            for entry in sorted(save.iterdir()):  # the folder itself stays: it carries the lock
                durable.remove(entry)
            durable.make_dir(save / RUN_DIR)
            state = cls(save, _fresh(fingerprint), lock_fd, num_layers)
            state.commit()
            return state
        except BaseException:
            os.close(lock_fd)
            raise

    # -- committing ----------------------------------------------------------------------------
    def commit(self, outputs: dict[str, durable.FileRecord] | None = None, stage: int | None = None,
               run_files: dict[str, durable.FileRecord] | None = None, **changes) -> None:
        """Record new outputs (written by `stage`) and/or the new set of run files, with `changes`
        to the progress fields; then delete the run files no longer named."""
        if outputs:
            durable.sync_dir(self.save)
            for name, record in outputs.items():
                self.manifest["outputs"][name] = {**record.as_dict(), "stage": stage}
        if run_files is not None:
            durable.sync_dir(self.dir)
            self.manifest["run_files"] = {name: record.as_dict() for name, record in run_files.items()}
        self.manifest.update(changes)
        durable.write_text(self.dir / MANIFEST, json.dumps(self.manifest, indent=1, default=str))
        durable.sync_dir(self.dir)
        self._delete_unnamed_run_files()

    def run_file_record(self, name: str) -> durable.FileRecord:
        entry = self.manifest["run_files"][name]
        return durable.FileRecord(entry["size"], entry["crc32"])

    def release(self) -> None:
        os.close(self._lock_fd)

    # -- resuming ------------------------------------------------------------------------------
    def _clean_strays(self) -> None:
        """Half-written temporary files of a killed run."""
        for stray in [*self.save.glob("*" + durable.TMP_SUFFIX), *self.dir.glob("*" + durable.TMP_SUFFIX)]:
            durable.remove(stray)
        self._delete_unnamed_run_files()

    def _delete_unnamed_run_files(self) -> None:
        named = set(self.manifest["run_files"]) | {MANIFEST}
        for path in sorted(self.dir.iterdir()):
            if path.name not in named:
                durable.remove(path)

    def _roll_back_to_intact(self) -> None:
        """Check every file the manifest names; go back to the last stage whose files are intact."""
        problems = [(0, RUN_DIR + "/" + name, durable.damage(self.dir / name, record))
                    for name, record in self.manifest["run_files"].items()]
        problems += [(record["stage"], name, durable.damage(self.save / name, record))
                     for name, record in self.manifest["outputs"].items()]
        problems = sorted((stage, name, why) for stage, name, why in problems if why)
        if not problems:
            return
        stage, name, why = problems[0]
        m = self.manifest
        if stage < self.num_layers:
            redo = "from the calibration capture and block 0"
            self.manifest = _fresh(m["fingerprint"])
        elif stage == self.num_layers:
            redo = "the tensors outside the blocks, index and config files (all blocks are intact)"
            m["outputs"] = {n: r for n, r in m["outputs"].items() if r["stage"] < stage}
            m.update(finalized=False, finished=False)
        else:
            redo = "the report (the model files are intact)"
            m["outputs"] = {n: r for n, r in m["outputs"].items() if r["stage"] < stage}
            m.update(finished=False)
        # One line even with --quiet: the user should know the run repaired something.
        print(f"offload-prune: {name} is damaged ({why}); redoing {redo}, which is safe: it recomputes "
              "the same result", file=sys.stderr)
        self.commit(run_files={} if stage < self.num_layers else None)


class FollowerState(RunState):
    """Across torchrun ranks, what every rank but rank 0 holds: rank 0's manifest, read when the run
    started, whose progress fields follow the run in memory. Rank 0 alone locks the folder, writes and
    names files (the other ranks' activation files included)."""

    def __init__(self, save: Path, manifest: dict, num_layers: int):
        super().__init__(save.expanduser().absolute(), manifest, -1, num_layers)

    def commit(self, outputs=None, stage=None, run_files=None, **changes) -> None:
        self.manifest.update(changes)

    def run_file_record(self, name: str) -> None:
        return None

    def release(self) -> None:
        pass


def recorded_fingerprint(save: Path | None) -> dict | None:
    """The fingerprint of the run `save` holds (started or finished), or None: what a run resuming it
    must resolve its `auto` choices to when they change the output's files."""
    manifest = _read_manifest(save / RUN_DIR / MANIFEST) if save is not None else None
    return manifest["fingerprint"] if manifest is not None else None


def _read_manifest(path: Path) -> dict | None:
    """The manifest is replaced atomically, so it is whole or absent; anything else is not ours."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    required = set(_fresh({}))
    return manifest if isinstance(manifest, dict) and required <= set(manifest) else None


def _holds_anything(save: Path) -> bool:
    """Anything but a run folder without a manifest (a run killed before its first commit)."""
    for entry in save.iterdir():
        if entry.name == RUN_DIR and entry.is_dir() and not (entry / MANIFEST).exists():
            continue
        return True
    return False


def _lock(save: Path, what: str = "--save") -> int:
    fd = os.open(save, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OffloadPruneError(f"{what} {save} is in use by another offload-prune process; wait for it to "
                                "finish (or stop it: a stopped run resumes with the same command)") from None
    return fd


def check_output_folder(save: Path, input_folder: Path) -> None:
    """Refuses, in a moment and before anything heavy is loaded, an output folder the run could not take:
    a file, under a file, the input's, or in use by another run (whose lock RunState.prepare would meet
    only after calibration)."""
    save = save.expanduser().absolute()
    _refuse_unsafe_output(save, input_folder)
    if save.is_dir():
        os.close(_lock(save))  # taken and given back at once; prepare takes it for the run


def _refuse_unsafe_output(save: Path, input_folder: Path) -> None:
    if save.exists() and not save.is_dir():
        raise OffloadPruneError(f"--save {save} is a file; give a folder (new, empty, or a run's own output)")
    above = next((parent for parent in save.parents if parent.exists()), None)
    if above is not None and not above.is_dir():
        raise OffloadPruneError(f"--save {save}: {above} is a file, so no folder can be made under it")
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
