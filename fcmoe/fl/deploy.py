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

import datetime
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

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fcmoe.files import write_private
from fcmoe.fl.node_settings import node_config
from fcmoe.fl.waiting import poll

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
    def listening() -> bool:
        if process.poll() is not None:
            tail = log_file.read_text()[-600:]
            raise RuntimeError(f"{process.args[0]} exited with code {process.returncode}: {tail}")
        with socket.socket() as sock:
            # a port in the ephemeral range can "accept" a probe from itself (a TCP self-connect) before the
            # server listens: that is not a listener (seen once in CI: registration then found no SuperLink)
            return sock.connect_ex(("127.0.0.1", port)) == 0 and sock.getsockname() != sock.getpeername()

    if not poll(listening, bool, timeout_s, 0.5):
        raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def _register_node(flwr: Callable[..., subprocess.CompletedProcess], public: Path,
                   timeout_s: float = 30.0) -> subprocess.CompletedProcess:
    """``flwr supernode register``, retried while the SuperLink is not serving yet (its port opens first)."""
    return poll(lambda: flwr("supernode", "register", str(public), CONNECTION),
                lambda reply: reply.returncode == 0 or "unavailable" not in reply.stdout + reply.stderr, timeout_s, 1.0)


@dataclass
class DeploymentHandle:
    """The running deployment, handed to a ``during`` callback (the tests' fault injection): its processes (the
    SuperLink first, then SuperNode i at ``1 + i``), their logs, how to start one again, and a flag to set when the
    callback has killed the whole deployment (the status is then ``"killed"``)."""

    processes: list[subprocess.Popen]
    logs: dict[str, Path]
    start: Callable[[str, list[str]], subprocess.Popen]
    timeout_s: float
    crashed: threading.Event = field(default_factory=threading.Event)


def deploy_local(app_dir: Path, num_nodes: int, run_config: str, *, base_port: int = 39200,
                 timeout_s: float = 900.0, workdir: Path | None = None, node_options: str = "",
                 during: Callable[[DeploymentHandle], None] | None = None) -> Deployment:
    """Run the Flower app in ``app_dir`` on a local TLS + authenticated deployment; see the module docstring.

    ``run_config`` is passed to ``flwr run --run-config``; ports ``base_port`` (the SuperLink's HTTPS API) to
    ``base_port + num_nodes`` (one ClientAppIO port per node) on 127.0.0.1 are used. ``node_options`` is appended
    to every SuperNode's ``--node-config``, e.g. ``"state-dir='/srv/fcmoe' warm-cache=false"``. ``during`` runs in
    a thread of its own once every process is up, with a :class:`DeploymentHandle` (the tests kill or restart
    processes through it).
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
        handle = DeploymentHandle(processes, logs, start, timeout_s)
        if during is not None:
            threading.Thread(target=during, args=(handle,), daemon=True).start()
        submitted = flwr("run", str(app_dir), CONNECTION, "--stream", "--run-config", run_config, timeout=timeout_s)
        (work / "flwr-run.log").write_text(submitted.stdout + submitted.stderr)
        if handle.crashed.is_set():
            status = "killed"
        elif submitted.returncode != 0:  # refused before it ran (e.g. an invalid run config): no status to wait for
            status = "refused: " + " ".join((submitted.stdout + submitted.stderr).split())[-300:]
        else:
            status = _final_status(flwr, timeout_s)
        return Deployment(status, startup_s, time.perf_counter() - run_started, work, logs)
    finally:
        _stop(processes)


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each process group (the process and its children), SIGKILL what is left after 15 s."""
    for proc in reversed(processes):
        signal_group(proc, signal.SIGTERM)
    for proc in processes:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
    time.sleep(1.0)
    for proc in processes:  # children that outlived their parent
        signal_group(proc, signal.SIGKILL)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to ``proc``'s process group (it and what it spawned); gone already is fine."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _final_status(flwr, timeout_s: float) -> str:  # noqa: ANN001 - the local runner above
    """The newest run's status once it is final (``finished:…``), from ``flwr ls --format json``; the last one
    seen when ``timeout_s`` pass first."""
    seen = ["unknown"]

    def newest() -> str:
        try:
            runs = json.loads(flwr("ls", "--format", "json").stdout).get("runs", [])
        except json.JSONDecodeError:  # a listing cut short: the last status seen stands
            runs = []
        if runs:
            seen.append(max(runs, key=lambda r: r.get("pending-at", ""))["status"])
        return seen[-1]

    return poll(newest, lambda status: status.startswith("finished"), timeout_s, 2.0)
