"""Helpers for the cfn-redis tests: private redis-server processes, key listings.

Imported by this directory's conftest and tests (uniquely named: tests of
several plugins share one pytest session).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: Redis tests must run, not skip)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
            client.connection_pool.disconnect()
    except Exception:
        return False


class RedisServer:
    """A private redis-server process: ``url``, ``restart()``, ``stop()``, ``client()``."""

    def __init__(self, bind: str = "127.0.0.1", password: str | None = None, port: int | None = None, daemon: bool = False,
                 tls_dir: str | None = None):
        self.tls_dir = tls_dir  # a directory to put a self-signed certificate in: the server speaks TLS only
        self.daemon = daemon  # a daemonized server is not our child (no_leaks counts children)
        self.pidfile = f"/tmp/cfn-test-redis-{os.getpid()}-{id(self)}.pid"
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            _unavailable("redis-server is not installed")
        self.bind = bind
        self.password = password
        self.port = port or _free_port()
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}{bind}:{self.port}/0"
        if tls_dir:
            self.cert = os.path.join(tls_dir, "cert.pem")
            self.key = os.path.join(tls_dir, "key.pem")
            if shutil.which("openssl") is None:
                _unavailable("openssl is not installed (needed for a TLS test certificate)")
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key, "-out", self.cert,
                 "-days", "1", "-subj", f"/CN={bind}", "-addext", f"subjectAltName=IP:{bind}"],
                check=True, capture_output=True,
            )
            self.url = f"rediss://{auth}{bind}:{self.port}/0?ssl_ca_certs={self.cert}"
        self.proc = None
        self.start()

    def start(self) -> None:
        port = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.cert, "--tls-key-file", self.key,
                "--tls-ca-cert-file", self.cert, "--tls-auth-clients", "no"] if self.tls_dir else ["--port", str(self.port)]
        cmd = [self.binary, *port, "--bind", self.bind, "--save", "", "--appendonly", "no",
               "--daemonize", "yes" if self.daemon else "no", "--pidfile", self.pidfile, "--loglevel", "warning"]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if self.daemon:
            self.proc.wait()
            self.proc.stderr.close()
            self.proc = None
        deadline = time.monotonic() + 10
        while not _ping(self.url):
            died = self.proc is not None and self.proc.poll() is not None
            if died or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if died else ""
                self.stop()
                _unavailable(f"could not start redis-server on port {self.port}: {err.strip()[:300]}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if self.daemon:
            try:
                with open(self.pidfile) as f:
                    os.kill(int(f.read().strip()), 9)
                os.unlink(self.pidfile)
            except (OSError, ValueError):
                pass
        if proc is not None:
            proc.kill()
            proc.wait()
            proc.stderr.close()

    def restart(self) -> None:
        """Kill -9 and start again on the same port: everything in it is lost (no persistence)."""
        self.stop()
        self.start()

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)



def run_keys(url: str, run: str) -> list[bytes]:
    """Every key of ``run`` still in Redis."""
    import redis

    from cfn_redis import keys

    client = redis.Redis.from_url(url)
    try:
        return [k for p in keys.run_patterns(run) for k in client.scan_iter(match=p)]
    finally:
        client.close()
        client.connection_pool.disconnect()
