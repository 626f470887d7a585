"""Runs offload-prune many times, fast, for the crash tests: one process imports everything and
runs once in-process to warm up (one thread, so no OpenMP or tokenizer pool exists to break
across fork), then forks a fresh child per request, as if each were a new command.

Protocol: one JSON request per line on stdin, {"argv": [...], "env": {...}, "cwd": folder or null,
"fsize_limit": bytes or null, "output": path}; one JSON line back, {"code": exit status, or -signal if killed}. The
child's stdout and stderr go to `output`."""
import gc
import json
import os
import resource
import signal
import sys

os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
# A process started in the background by a non-interactive shell inherits SIGINT ignored, and Python
# then installs no KeyboardInterrupt handler; a user's Ctrl-C reaches a terminal's foreground process.
signal.signal(signal.SIGINT, signal.default_int_handler)

import torch  # noqa: E402

torch.set_num_threads(1)

from offload_prune.disk import durable  # noqa: E402
from offload_prune.cli import main  # noqa: E402


def run(request: dict) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            os.environ.update(request.get("env", {}))
            os.chdir(request.get("cwd") or os.getcwd())
            if request.get("fsize_limit"):
                resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize_limit"], request["fsize_limit"]))
            durable.reset_steps()
            code = main(request["argv"])
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def serve() -> None:
    warm_up = json.loads(sys.argv[1])
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        main(warm_up)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
    # Everything imported stays: frozen, each child's gc.collect (one per phase) skips the ~350k
    # objects of torch and transformers (0.3 s each) and leaves their pages shared after fork.
    gc.collect()
    gc.freeze()
    for line in sys.stdin:
        print(json.dumps({"code": run(json.loads(line))}), flush=True)


if __name__ == "__main__":
    serve()
