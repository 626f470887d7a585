"""One live run per output folder, and running out of disk space: clear lines, nothing lost."""
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from offload_prune.cli import main

from conftest import folder_digests, quick_args, run_cli


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    return checkpoint_factory(num_layers=3, hidden=64, intermediate=128, max_shard_size="40KB")


args = quick_args


@pytest.fixture(scope="module")
def uninterrupted(model, tmp_path_factory):
    save = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert main(args(model, save)) == 0
    return folder_digests(save)


def start_paused(model, save, step: str) -> subprocess.Popen:
    """A run that stops itself (SIGSTOP) at `step`, holding whatever it holds there."""
    env = {**os.environ, "OFFLOAD_PRUNE_KILL_AT_STEP": step, "OFFLOAD_PRUNE_KILL_SIGNAL": "STOP"}
    process = subprocess.Popen([sys.executable, "-m", "offload_prune", *args(model, save)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        with open(f"/proc/{process.pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "T":
                return process
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the run never reached its stop")


def test_second_run_on_a_live_output_folder_is_refused(model, uninterrupted, tmp_path):
    save = tmp_path / "out"
    first = start_paused(model, save, "rename:acts_00001.bin")
    try:
        for extra in ([], ["--overwrite"]):
            second = run_cli(*args(model, save, *extra))
            assert second.returncode == 2
            assert second.stderr.strip() == (f"offload-prune: error: --save {save} is in use by another offload-prune "
                                              "process; wait for it to finish (or stop it: a stopped run resumes "
                                              "with the same command)")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert folder_digests(save) == uninterrupted  # the live run was not harmed


def test_lock_is_released_by_a_killed_run(model, uninterrupted, tmp_path):
    save = tmp_path / "out"
    first = start_paused(model, save, "rename:acts_00001.bin")
    first.kill()
    first.wait()
    assert main(args(model, save)) == 0
    assert folder_digests(save) == uninterrupted


def test_not_enough_disk_space_is_refused_before_writing(model, tmp_path, capsys, monkeypatch):
    import offload_prune.disk.diskspace as diskspace
    monkeypatch.setattr(diskspace, "_free_bytes", lambda save: 50_000)
    assert main(args(model, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "the run needs about" in err and "48.83 KiB is free" in err  # 50,000 bytes, in human units
    assert not (tmp_path / "out").exists()


@pytest.fixture
def small_filesystem(tmp_path):
    """A 16 MiB tmpfs, when this machine lets us mount one (root with CAP_SYS_ADMIN)."""
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small file system here")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_mid_run_then_resume(model, uninterrupted, small_filesystem):
    save = small_filesystem / "out"
    first = start_paused(model, save, "rename:acts_00001.bin")
    filler = small_filesystem / "filler"
    with open(filler, "wb") as f:  # another program fills the disk while the run is working
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 2
    line = err.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "no space left on device" in line and "needs about" in line and "run the same command again" in line
    assert not list(save.rglob("*.tmp"))
    filler.unlink()
    assert main(args(model, save)) == 0
    assert folder_digests(save) == uninterrupted
