"""A process that has imported ullme's heavy dependencies once and forks a fresh `ullme` process per request.

Most of a test's `ullme` subprocess goes to importing torch, transformers, peft and mteb (4–9 s at one thread
on the 2-core CI machines, a few hundred calls per suite). `run_cli` (conftest.py) sends each call here
instead: the forked child sets the call's environment, working directory and standard streams, then runs
`python -m ullme_cli` as a fresh interpreter would, exit status and signals included. ullme's own modules are
not imported before the fork, so each call imports them anew and reads its environment at call time.

Protocol (one JSON object per line): the test sends {"argv", "env", "cwd", "stdin", "stdout", "stderr"}
(the streams as file paths); the zygote answers {"pid"} when the child starts and {"status"} when it ends,
with the status as `subprocess` reports it (negative for a signal).

What it does not cover: anything that happens while Python and these libraries import (their import-time
environment is the zygote's). Tests of kills, signals and multi-process launches start real processes.
"""

import json
import os
import sys

# Imported before any fork, never used here: a child inherits them loaded. Nothing may start threads or
# touch torch's thread pool in this process, so that a fork is as clean as a new interpreter.
import numpy  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
import transformers.models.qwen2.modeling_qwen2  # noqa: F401
import peft  # noqa: F401
import faiss  # noqa: F401
import mteb  # noqa: F401


def run_child(request: dict) -> None:
    """In the forked child: become `python -m ullme_cli ARGS` with the request's environment and streams."""
    os.setpgid(0, 0)  # its own group, so that a timeout kills what it started too
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, mode in ((0, request["stdin"], os.O_RDONLY), (1, request["stdout"], os.O_WRONLY), (2, request["stderr"], os.O_WRONLY)):
        opened = os.open(path, mode)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin, sys.stdout, sys.stderr = (open(fd, mode, closefd=False, encoding="utf-8", errors="surrogateescape")
                                         for fd, mode in ((0, "r"), (1, "w"), (2, "w")))  # fmt: skip
    sys.stderr.reconfigure(errors="backslashreplace", line_buffering=True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    import runpy

    sys.argv = ["ullme_cli", *request["argv"]]
    code = 0
    try:
        runpy.run_module("ullme_cli", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else (print(stop.code, file=sys.stderr) or 1))
    except BaseException:  # what the interpreter does with an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main() -> None:
    answers = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                run_child(request)
            finally:
                os._exit(70)
        print(json.dumps({"pid": pid}), file=answers, flush=True)
        _, wait_status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(wait_status)}), file=answers, flush=True)


if __name__ == "__main__":
    main()
