#!/usr/bin/env python3
"""Starts the repository's Python scripts (train_gpt.py, tests/dist_worker.py, bench/*.py) as forked
children of one process that has already imported torch, torch._dynamo (torch.optim imports it on
first use) and train_gpt: a fresh `python3 train_gpt.py` spends ~4 s of a tiny CPU run on those
imports (and, in a fresh Inductor cache folder, ~9 s more on Inductor's probe of the CPU's vector
instructions, which the server also runs once). Each run is still a process of its own: its own
environment, working directory, stdin/stdout/stderr (the caller's, passed over the socket), default
signal dispositions, torch thread count (OMP_NUM_THREADS) and exit status. train_gpt.py runs as
train_gpt.main() of the imported module; another script runs as __main__ (runpy), and its `import
train_gpt` finds the imported one. With --nproc N the script runs as N ranks with the variables
torchrun --standalone sets (gloo on CPU).

usage: python3 tests/forkserver.py serve SOCKET
       python3 tests/forkserver.py run SOCKET [--nproc N] SCRIPT [ARGS...]
           (a launcher: scripts/run_seeds.sh's LAUNCH="python3 tests/forkserver.py run SOCKET";
           SIGTERM and SIGINT sent to it are passed on to the run)

The server handles one request at a time (the test suite runs one test at a time); a client that goes
away (killed, timed out) takes its run with it. Scripts outside the repository are refused (another
train_gpt.py, e.g. a packed one, would clash with the imported module: run it with python3).
"""
import functools
import json
import os
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRAIN_GPT = ROOT / "train_gpt.py"


# --- client ------------------------------------------------------------------------------------

def request(sock_path: str, script: str, args: list[str], env: dict, cwd: str, fds: list[int], nproc: int = 1,
            timeout: float | None = None, connect_timeout: float = 120.0, forward_signals: bool = False) -> int:
    """Run `script args` through the server with stdin/stdout/stderr = fds; its exit status (as
    subprocess reports it: negative for a signal). Raises TimeoutError after `timeout` s (the run is
    killed)."""
    deadline = time.monotonic() + connect_timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:  # the server binds its socket once its imports are done
        try:
            s.connect(sock_path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with s:
        payload = json.dumps(dict(script=script, args=list(args), env=dict(env), cwd=str(cwd), nproc=nproc)).encode()
        socket.send_fds(s, [struct.pack("!I", len(payload)) + payload], list(fds))
        s.settimeout(timeout)
        if forward_signals:  # pass them on (one byte each: the signal number)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, _frame: s.send(bytes([signum])))
        replies = s.makefile("r")
        try:
            for line in replies:
                reply = json.loads(line)
                if "error" in reply:
                    raise RuntimeError(f"forkserver: {reply['error']}")
                if "rc" in reply:
                    return reply["rc"]
        except socket.timeout:
            raise TimeoutError(f"{script}: no exit after {timeout} s (killed)") from None
    raise RuntimeError("forkserver: the server closed the connection without an exit status")


def run(sock_path: str, script: str, args: list[str], env: dict, cwd: str, nproc: int = 1,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """As subprocess.run([python3, script, *args], capture_output=True, text=True, timeout=timeout)."""
    import tempfile
    argv = [script, *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, open(os.devnull, "rb") as null:
        try:
            rc = request(sock_path, script, args, env, cwd, [null.fileno(), out.fileno(), err.fileno()], nproc, timeout)
        except TimeoutError:
            raise subprocess.TimeoutExpired(argv, timeout) from None
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, rc, out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def client_main(argv: list[str]) -> int:
    sock_path, rest = argv[0], argv[1:]
    nproc = 1
    if rest[:1] == ["--nproc"]:
        nproc, rest = int(rest[1]), rest[2:]
    rc = request(sock_path, rest[0], rest[1:], dict(os.environ), os.getcwd(), [0, 1, 2], nproc, forward_signals=True)
    return 128 - rc if rc < 0 else rc


# --- server ------------------------------------------------------------------------------------

def recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, 4, 3)
    while len(head) < 4:
        head += conn.recv(4 - len(head))
    (size,) = struct.unpack("!I", head)
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("truncated request")
        body += chunk
    return json.loads(body), fds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(target, fds: list[int], env: dict, cwd: str, argv: list[str], default_threads: int):
    """In the forked process: become `python3 argv...` and never return."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own group: a kill reaches what it starts (git, ...)
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = argv
        import torch
        threads = env.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else default_threads)
        code = target()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def train_gpt_main() -> int:
    import train_gpt
    return train_gpt.main()


def run_as_main(path: Path) -> int:
    """`python3 path`: the script's folder first on sys.path, run as __main__."""
    sys.path.insert(0, str(path.parent))
    runpy.run_path(str(path), run_name="__main__")
    return 0


def handle(conn: socket.socket, listener: socket.socket, default_threads: int):
    req, fds = recv_request(conn)
    try:
        path = Path(req["cwd"], req["script"]).resolve()
        if not (path.is_file() and path.suffix == ".py" and path.is_relative_to(ROOT)) or \
                (path.name == "train_gpt.py" and path != TRAIN_GPT):
            conn.sendall((json.dumps(dict(error=f"{path}: not a script of this repository")) + "\n").encode())
            return
        target = train_gpt_main if path == TRAIN_GPT else functools.partial(run_as_main, path)
        nproc = int(req["nproc"])
        ranks = [{}] if nproc == 1 else [
            dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0",
                 ROLE_RANK=str(r), ROLE_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            for port in [free_port()] for r in range(nproc)]
        pids = []
        for extra in ranks:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                conn.close()
                listener.close()
                child(target, fds, req["env"] | extra, req["cwd"], [str(path), *req["args"]], default_threads)
            pids.append(pid)
    finally:
        for fd in fds:
            os.close(fd)
    rcs = {}
    gone = False
    while len(rcs) < len(pids):
        for pid in pids:
            if pid not in rcs:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    rcs[pid] = os.waitstatus_to_exitcode(status)
        failed = any(rc != 0 for rc in rcs.values())
        if not gone and select.select([conn], [], [], 0.02)[0]:
            data = conn.recv(16)
            gone = not data  # the client closed: timed out or killed
            for signum in data:  # signals the client was sent
                for pid in pids:
                    if pid not in rcs:
                        try:
                            os.killpg(pid, signum)
                        except ProcessLookupError:
                            pass
        if gone or failed:  # as torchrun: one rank failing ends the others
            for pid in pids:
                if pid not in rcs:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
    rc = next((rcs[p] for p in pids if rcs[p] != 0), 0)
    if not gone:
        try:
            conn.sendall((json.dumps(dict(rc=rc)) + "\n").encode())
        except OSError:
            pass


def serve(sock_path: str) -> int:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    import torch
    import torch._dynamo  # noqa: F401  (torch.optim imports it on first use: ~2 s)
    import train_gpt  # noqa: F401
    # Inductor's probe of the CPU's vector instructions (a property of the machine), cached in this process: a run
    # in a fresh TORCHINDUCTOR_CACHE_DIR would otherwise build its test programs again
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    pick_vec_isa()
    default_threads = torch.get_num_threads()
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{sock_path}.tmp"
    listener.bind(tmp)
    os.rename(tmp, sock_path)  # the socket appears ready to accept
    listener.listen(8)
    listener.settimeout(1.0)
    while os.getppid() == parent:  # the test session that started it is gone: stop
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            continue
        with conn:
            conn.settimeout(None)
            try:
                handle(conn, listener, default_threads)
            except (OSError, ValueError, KeyError) as e:
                print(f"forkserver: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        sys.exit(serve(sys.argv[2]))
    if len(sys.argv) >= 4 and sys.argv[1] == "run":
        sys.exit(client_main(sys.argv[2:]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
