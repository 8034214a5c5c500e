"""``fcmoe deploy-local``: a real Flower deployment on 127.0.0.1 — TLS, SuperNode authentication, N SuperNodes.

What it does, in order (every process it starts, and what those spawn, is stopped by process group at the end,
whatever happens):
1. a throw-away CA and a server certificate for ``localhost`` / ``127.0.0.1`` (``cryptography``, no openssl);
2. one EC P-384 key pair per SuperNode (OpenSSH format, as Flower's node authentication reads them);
3. a SuperLink with ``--ssl-*`` and ``--enable-supernode-auth``; a private ``FLWR_HOME`` whose ``config.toml``
   names it as the connection ``fcmoe-local`` (address of the Control API, CA as root certificate);
4. ``flwr supernode register`` of every public key, then N SuperNodes, node i with
   ``--node-config "partition-id=i num-partitions=N"`` and its own ClientAppIO port;
5. ``flwr run <repo> fcmoe-local --stream`` with the experiment overrides, then the run's real status from
   ``flwr ls --format json`` (``flwr run`` exits 0 even when the ServerApp failed).
The SuperLink keeps its state in memory: with its SQLite database (``--database``), 10 SuperNodes featurising at
once on 2 cores made it answer "database is locked" (HTTP 500) to pushed replies and to its own SuperExec, which
exited, and the run waited for replies that never came. fcmoe's own state (checkpoints, node state) is on disk.
Across machines the same steps apply with real addresses: see the README's deployment section.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fcmoe.files import write_private
from fcmoe.fl.node_settings import node_config

log = logging.getLogger(__name__)

CONNECTION = "fcmoe-local"


@dataclass
class Deployment:
    """Outcome of :func:`deploy_local`."""

    status: str  # e.g. "finished:completed"
    startup_s: float  # certificates, SuperLink, registrations, SuperNodes up
    run_s: float  # flwr run until the status is final
    workdir: Path
    logs: dict[str, Path] = field(default_factory=dict)


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(ca.crt, server.pem, server.key): a one-day CA and a server certificate for localhost / 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fcmoe local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                          x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    write_private(paths[2], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    return paths


def make_node_keys(folder: Path, index: int) -> tuple[Path, Path]:
    """(private, public) EC P-384 key files of SuperNode ``index``, OpenSSH format."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"node_{index}", folder / f"node_{index}.pub"
    write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def _wait_for_port(port: int, timeout_s: float, process: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_file.read_text()[-600:]
            raise RuntimeError(f"{process.args[0]} exited with code {process.returncode}: {tail}")
        with socket.socket() as sock:
            # a port in the ephemeral range can "accept" a probe from itself (a TCP self-connect) before the
            # server listens: that is not a listener (seen once in CI: registration then found no SuperLink)
            if sock.connect_ex(("127.0.0.1", port)) == 0 and sock.getsockname() != sock.getpeername():
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def _register_node(flwr: Callable[..., subprocess.CompletedProcess], public: Path,
                   timeout_s: float = 30.0) -> subprocess.CompletedProcess:
    """``flwr supernode register``, retried while the SuperLink is not serving yet (its port opens first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        registered = flwr("supernode", "register", str(public), CONNECTION)
        starting = "unavailable" in registered.stdout + registered.stderr
        if registered.returncode == 0 or not starting or time.monotonic() > deadline:
            return registered
        time.sleep(1.0)


def deploy_local(app_dir: Path, num_nodes: int, run_config: str, *, base_port: int = 39200,
                 timeout_s: float = 900.0, workdir: Path | None = None, node_options: str = "",
                 kill_last_node_when: str | None = None, kill_all_when: str | None = None,
                 restart_after_train: tuple[int, int] | None = None) -> Deployment:
    """Run the Flower app in ``app_dir`` on a local TLS + authenticated deployment; see the module docstring.

    ``run_config`` is passed to ``flwr run --run-config``; ports ``base_port`` (the SuperLink's HTTPS API) to
    ``base_port + num_nodes`` (one ClientAppIO port per node) on 127.0.0.1 are used. ``kill_last_node_when``
    is fault injection: once a non-empty file matches that glob pattern (e.g. the run's ``metrics.jsonl`` after
    round 1), the last SuperNode is killed with SIGKILL, and the run has to finish without it. ``kill_all_when``
    kills everything (SuperLink, ServerApp, every SuperNode) the same way, a crash of the whole deployment: the
    status is then ``"killed"``, and a new deployment with ``resume-dir`` in ``run_config`` continues the run.
    ``restart_after_train = (node, round)`` stops SuperNode ``node`` (SIGTERM to its process group) once its reply
    to that round's train message has reached the SuperLink, and starts it again with the same key and node
    config (:func:`_restart_node`). ``node_options`` is appended to every SuperNode's ``--node-config``, e.g.
    ``"state-dir='/srv/fcmoe' warm-cache=false"``.
    """
    started = time.perf_counter()
    work = workdir or Path(tempfile.mkdtemp(prefix="fcmoe-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_HOME": str(work / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    link = base_port  # flwr 1.41 serves the Fleet, Control and Runtime APIs over one HTTPS port
    ca, cert, key = make_certificates(work)
    processes: list[subprocess.Popen] = []
    logs: dict[str, Path] = {}

    def start(name: str, args: list[str]) -> subprocess.Popen:
        logs.setdefault(name, work / f"{name}.log")
        with logs[name].open("a") as out:
            # a session of its own: stopping the group also stops what it spawned (SuperExec, app processes)
            processes.append(subprocess.Popen(args, env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        return processes[-1]

    def flwr(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([str(bin_dir / "flwr"), *args], env=env, cwd=work, capture_output=True, text=True,
                              timeout=timeout)

    try:
        start("superlink", [str(bin_dir / "flower-superlink"), "--ssl-ca-certfile", str(ca), "--ssl-certfile",
                            str(cert), "--ssl-keyfile", str(key), "--enable-supernode-auth",
                            "--host", "127.0.0.1", "--port", str(link)])  # state in memory: see below
        _wait_for_port(link, 60, processes[0], logs["superlink"])
        (work / "flwr-home").mkdir(exist_ok=True)
        (work / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{link}"\nroot-certificates = "{ca}"\n')
        for i in range(num_nodes):
            private, public = make_node_keys(work, i)
            registered = _register_node(flwr, public)
            if registered.returncode != 0:
                raise RuntimeError(f"registering node {i} failed: {registered.stdout[-500:]}{registered.stderr[-500:]}")
            start(f"supernode_{i}", [str(bin_dir / "flower-supernode"), "--root-certificates", str(ca),
                                     "--superlink", f"127.0.0.1:{link}", "--host", "127.0.0.1", "--port",
                                     str(base_port + 1 + i), "--auth-supernode-private-key", str(private),
                                     "--auth-supernode-public-key", str(public), "--node-config",
                                     f"{node_config(i, num_nodes)} {node_options}".strip()])
        time.sleep(2.0)
        for name, proc in zip(logs, processes, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}: {logs[name].read_text()[-600:]}")
        startup_s = time.perf_counter() - started
        run_started = time.perf_counter()
        killed = threading.Event()
        for pattern, victims in ((kill_last_node_when, processes[-1:]), (kill_all_when, list(processes))):
            if pattern:
                threading.Thread(target=_kill_when, args=(pattern, victims, timeout_s, killed), daemon=True).start()
        if restart_after_train:
            nodes = {i: processes[1 + i] for i in range(num_nodes)}
            threading.Thread(target=_restart_node, args=(*restart_after_train, nodes, logs, start, timeout_s),
                             daemon=True).start()
        submitted = flwr("run", str(app_dir), CONNECTION, "--stream", "--run-config", run_config, timeout=timeout_s)
        (work / "flwr-run.log").write_text(submitted.stdout + submitted.stderr)
        if kill_all_when and killed.is_set():
            status = "killed"
        elif submitted.returncode != 0:  # refused before it ran (e.g. an invalid run config): no status to wait for
            status = "refused: " + " ".join((submitted.stdout + submitted.stderr).split())[-300:]
        else:
            status = _final_status(flwr, timeout_s)
        return Deployment(status, startup_s, time.perf_counter() - run_started, work, logs)
    finally:
        _stop(processes)


def _kill_when(pattern: str, processes: list[subprocess.Popen], timeout_s: float, killed: threading.Event) -> None:
    """SIGKILL ``processes`` and their children once a non-empty file matches the glob ``pattern``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(Path(match).stat().st_size > 0 for match in glob.glob(pattern)):
            for process in processes:
                _signal_group(process, signal.SIGKILL)
                log.warning("fault injection: killed %s", " ".join(map(str, process.args[:1])))
            killed.set()
            return
        time.sleep(0.2)


def _restart_node(node: int, round_index: int, nodes: dict[int, subprocess.Popen], logs: dict[str, Path],
                  start: Callable[[str, list[str]], subprocess.Popen], timeout_s: float) -> None:
    """Stop SuperNode ``node`` after its reply to its ``round_index``-th train message (that round's, when it
    trains every round), then start it again.

    Deterministic, from the SuperNodes' own logs: the ClientApp process of every other node's train message is
    frozen (SIGSTOP) as soon as it starts, so the server cannot finish the train phase and send ``node`` anything
    new, while those SuperNodes go on sending heartbeats; ``node`` is stopped once its log says its train reply
    was "Sent successfully" (the SuperLink has it), started again with its own key and node config, and the
    frozen ClientApps go on once it is connected again. So the restart falls between two of ``node``'s
    messages, with its trained state on disk only.

    SIGTERM, not SIGKILL: a SuperNode that stops deactivates itself at the SuperLink, while one killed outright
    stays "online" there until two heartbeat intervals (60 s) pass, and Flower 1.41 refuses to activate its key
    again before that (error 2004).
    """
    victim = f"supernode_{node}"
    others = [i for i in nodes if i != node]
    frozen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not (_train_reply_sent(logs[victim], round_index)
                                                   and len(frozen) == len(others)):
            for i in others:
                if i not in frozen and _log_count(logs[f"supernode_{i}"], "Receiving: train message") >= round_index:
                    app = _client_app_process(nodes[i])
                    if app is not None:
                        app.suspend()
                        frozen[i] = app
            time.sleep(0.1)
        old = nodes[node]
        _signal_group(old, signal.SIGTERM)
        old.wait(timeout=30)
        connected = _log_count(logs[victim], "SuperNode ID")
        log.warning("fault injection: stopped SuperNode %d after its round-%d train reply; restarting it", node,
                    round_index)
        nodes[node] = start(victim, list(map(str, old.args)))
        while time.monotonic() < deadline and _log_count(logs[victim], "SuperNode ID") <= connected:
            time.sleep(0.2)
    finally:
        for app in frozen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                app.resume()


def _client_app_process(supernode: subprocess.Popen) -> psutil.Process | None:
    """The running ``flwr-clientapp`` process a SuperNode started, if there is one."""
    try:
        children = psutil.Process(supernode.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if child.status() != psutil.STATUS_ZOMBIE and any("flwr-clientapp" in a for a in child.cmdline()):
                return child
    return None


def _log_count(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text) if path.is_file() else 0


def _train_reply_sent(path: Path, round_index: int) -> bool:
    """Whether the SuperNode log at ``path`` says its ``round_index``-th train reply reached the SuperLink."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    parts = text.split("Sending: train message")
    return len(parts) > round_index and "Sent successfully" in parts[round_index]


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each process group (the process and its children), SIGKILL what is left after 15 s."""
    for proc in reversed(processes):
        _signal_group(proc, signal.SIGTERM)
    for proc in processes:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
    time.sleep(1.0)
    for proc in processes:  # children that outlived their parent
        _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _final_status(flwr, timeout_s: float) -> str:  # noqa: ANN001 - the local runner above
    """The newest run's status once it is final (``finished:…``), from ``flwr ls --format json``."""
    deadline = time.monotonic() + timeout_s
    status = "unknown"
    while time.monotonic() < deadline:
        listing = flwr("ls", "--format", "json")
        try:
            runs = json.loads(listing.stdout).get("runs", [])
        except json.JSONDecodeError:
            runs = []
        if runs:
            status = max(runs, key=lambda r: r.get("pending-at", ""))["status"]
            if status.startswith("finished"):
                return status
        time.sleep(2.0)
    return status
