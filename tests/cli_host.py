"""A fork server for the tests' `mimiq-deploy` calls: one process imports the command line and its heavy
libraries (torch, timm, onnx, ONNX Runtime) once, then forks a fresh child per call.

Each child is a new process, as `python -m mimiq_deploy ARGS` would be: its own environment, working directory,
stdout / stderr (files the caller reads), exit status, locks and signal handlers, nothing shared with the test
process or with the next call. What it does not pay is the ~4-6 s of imports per call (about 70 calls in the
suite). The server itself never runs a torch op or touches CUDA, so no thread pool exists when it forks.

Protocol (one call at a time): the test writes one JSON line {args, env, cwd, out, err}; the server answers
{"pid": n} when the child starts and {"code": c} when it has ended.
"""
import json
import os
import sys
import traceback


def _child(request: dict) -> int:
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    devnull = os.open(os.devnull, os.O_RDONLY)  # not the server's request pipe
    os.dup2(devnull, 0)
    os.close(devnull)
    for fd, path in ((1, request["out"]), (2, request["err"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False, buffering=1)
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False, buffering=1)
    sys.argv = ["mimiq-deploy", *request["args"]]
    code = 0
    try:
        from mimiq_deploy.cli import main
        main(args=request["args"], prog_name="mimiq-deploy")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:  # what the interpreter would print for an uncaught exception
        traceback.print_exc()
        code = 1
    import atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    import mimiq_deploy.cli  # noqa: F401 - the imports every call would pay
    import mimiq_deploy.export  # noqa: F401 - torch, timm, onnx and every back end's module
    import mimiq_deploy.quantize  # noqa: F401
    requests, replies = sys.stdin, sys.stdout
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_child(request))
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        replies.write(json.dumps({"code": code}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()
