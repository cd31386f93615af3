"""JAX's coordination service in a process of its own on process 0's host, so that the death of
process 0 stops the other processes the way any other lost process does.

`jax.distributed.initialize` starts the coordination service inside process 0. When process 0 is
killed, the service dies with it, and JAX's client ends every other process at once with its
own fatal error and stack trace (exit status 134) before any Python code can run; the hook that
would replace that, `missed_heartbeat_callback`, cannot take a Python function (jax 0.10).
Hosted apart, the service outlives process 0: the others' watchdogs see process 0's beat stop
as they see any process's, and stop with one line naming it and exit status 75
(`clip_jax.infra.watchdog`).

Process 0 calls `start` before it joins the job. JAX still insists on starting a service inside
process 0; `IDLE_ADDRESS` gives that one a port of its own on the loopback interface, where it
stays idle, while process 0's client connects to the real one like every other process's. The
service process (`python -m clip_jax.infra.coordination SPEC`, never run by hand):

- runs in a session of its own, so that a signal to process 0's process group (Ctrl-C in a
  terminal) leaves it serving while every process saves;
- refuses a port that something listens on already: gRPC binds with SO_REUSEPORT, so a
  coordinator left over from another job would silently share the port and split the job;
- never outlives the job: once process 0 is gone (ended or killed), it exits as soon as no
  process is connected to it any more (on Linux, its sockets in /proc/net/tcp*), and at the
  latest `linger(timeout)` seconds after (a host gone without closing its connection, or no
  /proc), leaving the port free for a relaunch. Its parent gone, init reaps it: no zombie.
"""

import contextlib
import errno
import json
import os
import select
import socket
import subprocess
import sys
import time

from absl import logging

from clip_jax.infra.errors import UsageError

IDLE_ADDRESS = "127.0.0.1:0"  # process 0's in-process service: any free port, no client
READY = "coordinator ready"  # the service process's first line once it serves
START_SECONDS = 120.0  # for the service process to import JAX and bind, on a loaded host
POLL_SECONDS = 0.1  # how often the service process looks at its parent, then its connections

_PROCESS: subprocess.Popen | None = None  # process 0's service process, kept from the collector


def linger(watch_timeout: float) -> float:
    """How long the service outlives process 0 at most: the others notice process 0 lost within
    the watchdog's timeout and a beat or two, then record it and exit."""
    return 2 * watch_timeout + 10


def start(
    coordinator: str,
    num_processes: int,
    heartbeat_timeout: int,
    shutdown_timeout: int,
    watch_timeout: float,
) -> None:
    """Starts the coordination service for `coordinator` (HOST:PORT) in a process of its own and
    waits until it serves; process 0 then joins with `coordinator_bind_address=IDLE_ADDRESS`.

    Args:
      coordinator: the address every process connects to; the service binds its port on every
        interface (JAX's default), or on `JAX_COORDINATOR_BIND_ADDRESS` when that is set.
      num_processes: the job's process count.
      heartbeat_timeout: JAX's own heartbeat timeout, in seconds, as the clients get it.
      shutdown_timeout: how long JAX's shutdown barrier waits, in seconds.
      watch_timeout: the watchdog's `--heartbeat_timeout_seconds` (`linger`).
    Raises:
      UsageError: the port is in use on this host.
    """
    global _PROCESS
    import jax

    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"coordinator address {coordinator!r}: expected HOST:PORT")
    spec = {
        "bind": os.environ.get("JAX_COORDINATOR_BIND_ADDRESS") or f"[::]:{port}",
        "num_processes": num_processes,
        "heartbeat_timeout": heartbeat_timeout,
        "shutdown_timeout": shutdown_timeout,
        "recoverable": bool(jax.config.jax_enable_recoverability),
        "parent": os.getpid(),
        "linger": linger(watch_timeout),
    }
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    python_path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    _PROCESS = subprocess.Popen(
        [sys.executable, "-m", "clip_jax.infra.coordination", json.dumps(spec)],
        env={**os.environ, "PYTHONPATH": python_path},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # its errors come back on the one pipe; it holds none of ours
        start_new_session=True,
    )
    output = _read_until_ready(_PROCESS.stdout, START_SECONDS)
    _PROCESS.stdout.close()
    if output is None:
        logging.info(
            "coordination service on %s, pid %d (the one JAX starts here stays idle)",
            spec["bind"],
            _PROCESS.pid,
        )
        return
    _PROCESS.kill()  # if still running (it hung): its start failed all the same
    _PROCESS.wait()
    errors = [line[len("error: ") :] for line in output.splitlines() if line.startswith("error: ")]
    if errors:
        raise UsageError(errors[-1])
    raise RuntimeError(f"the coordination service's process did not start:\n{output[-3000:]}")


def _read_until_ready(pipe, seconds: float) -> str | None:
    """None once `READY` is read from `pipe`; else everything read before its end or `seconds`."""
    deadline = time.monotonic() + seconds
    data = b""
    while (wait := deadline - time.monotonic()) > 0 and select.select([pipe], [], [], wait)[0]:
        chunk = os.read(pipe.fileno(), 65536)
        if not chunk:
            break
        data += chunk
        if f"\n{READY}\n".encode() in b"\n" + data:
            return None
    return data.decode(errors="replace")


# --- The service process ------------------------------------------------------------------------


def serve(spec: dict) -> None:
    """Runs the service until process 0 (`spec["parent"]`) is gone and no process is connected,
    or `spec["linger"]` seconds after process 0 is gone."""
    host, port = spec["bind"].rsplit(":", 1)
    if _in_use(host.strip("[]"), int(port)):
        print(
            f"error: port {port} of the coordinator address is in use on process 0's host (a "
            "coordinator of another job, or another program); choose another port",
            flush=True,
        )
        os._exit(2)
    from jax._src.lib import _jax  # JAX's own service, as jax.distributed.initialize makes it

    service = _jax.get_distributed_runtime_service(  # noqa: F841 (serves while referenced)
        spec["bind"],
        spec["num_processes"],
        heartbeat_timeout=spec["heartbeat_timeout"],
        shutdown_timeout=spec["shutdown_timeout"],
        recoverable=spec["recoverable"],
    )
    print(READY, flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # process 0 reads no further: the service's logs would fill the pipe
    os.dup2(devnull, 2)
    while os.getppid() == spec["parent"]:
        time.sleep(POLL_SECONDS)
    deadline = time.monotonic() + spec["linger"]
    while time.monotonic() < deadline and _connections(int(port)) != 0:
        time.sleep(POLL_SECONDS)
    os._exit(0)  # closes the port at once; the service's own shutdown would wait for clients


def _in_use(host: str, port: int) -> bool:
    """Whether something listens on `port` of `host` (`::`: every interface): a plain bind,
    which unlike gRPC's does not share the port."""
    addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT: free
                s.bind(address)
                return False
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True  # any other error: an address family this host lacks; try the next
    return False


def _connections(port: int) -> int | None:
    """How many connections to this process's `port` are open (the job's processes'), from
    /proc/net/tcp*; None where /proc does not tell."""
    mine = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):  # closed since listed
            mine.add(os.readlink(f"/proc/self/fd/{fd}"))
    count, read = 0, False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        read = True
        for row in rows:
            fields = row.split()  # local address, remote address, state (01: established), inode
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                count += f"socket:[{inode}]" in mine
    return count if read else None


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
