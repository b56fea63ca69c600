"""The first code that runs inside the sandbox (see sandbox.py); trusted, standard library only.

The sandbox starts it as ``python -I -S -c <this file's text> LIMITS_JSON PROGRAM``, so it needs no
file of its own inside the sandbox. It lowers the resource limits (soft = hard: the program cannot
raise them again), drops to an unprivileged uid when the sandbox was started as root, and then
replaces itself with the interpreter running PROGRAM.
"""

import json
import os
import resource
import sys


def main() -> None:
    config, program = json.loads(sys.argv[1]), sys.argv[2]
    for name, value in (("RLIMIT_AS", config["memory_bytes"]), ("RLIMIT_FSIZE", config["file_bytes"]),
                        ("RLIMIT_NPROC", config["processes"]), ("RLIMIT_NOFILE", config["open_files"]),
                        ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))
    # SIGXCPU at the soft limit, SIGKILL one second later should the program catch it
    resource.setrlimit(resource.RLIMIT_CPU, (config["cpu_s"], config["cpu_s"] + 1))
    uid = config["uid"]
    if uid is not None:
        # Started as root (with only CAP_SETUID and CAP_SETGID left): once every uid is non-zero the
        # kernel clears the remaining capabilities, and RLIMIT_NPROC, which root ignores, applies.
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if 0 in os.getresuid():
            sys.exit("megatrain sandbox: could not drop root")
    os.chdir("/tmp")  # the program's own directory, mode 700 and owned by the uid it runs as
    os.execv(config["python"], [config["python"], "-I", program])


main()
