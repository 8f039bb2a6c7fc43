# The harness of fuserl's `python-tests` verifier (embedded in the binary, written into each
# run's own temporary folder). It reads one job as JSON from standard input:
#     {"program": "...", "tests": ["assert ...", ...], "check": {"test": "...", "entry_point": "f"} | null,
#      "marker": "...", "memory_bytes": N, "cpu_seconds": N, "file_bytes": N}
# runs the program, then each test (or HumanEval's `check(entry_point)`), and prints one line
#     MARKER {"passed": P, "total": T, "violation": "..." | null, "error": "..." | null}
# An audit hook (it cannot be removed once added) refuses what a tested answer has no business
# doing: starting processes, opening network connections, loading C libraries, and writing,
# deleting or renaming files outside the current folder; the first refusal is reported as a
# violation (the answer scores 0). Memory, CPU time and file size are limited here (rlimits),
# the wall clock by fuserl, which kills the whole process group when the time is up.
import json
import os
import sys


def main():
    job = json.loads(sys.stdin.read())
    marker = job["marker"]
    # A process group of its own, so that fuserl can kill whatever the answer leaves behind; the
    # limits fuserl asks for (memory as address space, CPU seconds, largest file written).
    try:
        os.setsid()
    except OSError:
        pass
    import resource
    for name, value in (("RLIMIT_AS", job["memory_bytes"]), ("RLIMIT_CPU", job["cpu_seconds"]),
                        ("RLIMIT_FSIZE", job["file_bytes"]), ("RLIMIT_CORE", 0)):
        if hasattr(resource, name) and value is not None:
            try:
                resource.setrlimit(getattr(resource, name), (value, value))
            except (ValueError, OSError):
                pass
    here = os.path.realpath(os.getcwd())
    state = {"violation": None}

    def inside(path):
        try:
            if isinstance(path, int):
                return True
            p = os.path.realpath(os.fsdecode(path))
        except Exception:
            return False
        return p == here or p.startswith(here + os.sep)

    def refuse(what):
        if state["violation"] is None:
            state["violation"] = what
        raise PermissionError("fuserl python-tests: not allowed: " + what)

    def hook(event, args):
        if event == "open":
            path, mode = args[0], args[1]
            writing = isinstance(mode, str) and any(c in mode for c in "wax+")
            if isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
                writing = True
            if writing and not inside(path):
                refuse("writing " + repr(path))
        elif event in ("os.remove", "os.unlink", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                       "os.utime", "os.symlink", "os.link"):
            if not inside(args[0]):
                refuse(event + " " + repr(args[0]))
        elif event in ("os.rename", "os.replace"):
            if not inside(args[0]) or not inside(args[1]):
                refuse(event + " " + repr(args[0]) + " -> " + repr(args[1]))
        elif event in ("os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
                       "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg"):
            refuse(event)
        elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo"):
            refuse(event)
        elif event == "ctypes.dlopen" or event == "ctypes.cdata":
            refuse(event)

    # Keep what the harness itself needs before the hook is in place.
    write = sys.__stdout__.write
    flush = sys.__stdout__.flush
    sys.addaudithook(hook)

    passed, total, error = 0, 0, None
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(job["program"], "answer.py", "exec"), namespace)
        if job.get("check"):
            total = 1
            exec(compile(job["check"]["test"], "test.py", "exec"), namespace)
            namespace["check"](namespace[job["check"]["entry_point"]])
            passed = 1
        else:
            for i, test in enumerate(job["tests"]):
                total += 1
                try:
                    exec(compile(test, "test_%d.py" % i, "exec"), namespace)
                    passed += 1
                except BaseException as e:  # a failing test, whatever it raised
                    if error is None:
                        error = "test %d: %s: %s" % (i, type(e).__name__, e)
                    if isinstance(e, (KeyboardInterrupt, SystemExit)):
                        break
    except BaseException as e:
        total = max(total, 1 if job.get("check") else len(job["tests"]))
        error = "%s: %s" % (type(e).__name__, e)
    result = {"passed": passed, "total": total, "violation": state["violation"], "error": error and error[:500]}
    write("\n" + marker + " " + json.dumps(result) + "\n")
    flush()
    os._exit(0)


main()
