"""A real S3-compatible server for the tests: moto's standalone server, over HTTP on loopback.

Why moto (`moto[server]`, from PyPI): it installs with pip into the project's environment (no binary
to download, no container), starts in about a second, and speaks the S3 REST API over HTTP like any
object store, conditional puts (If-None-Match) and pagination included; the package's own boto3 client
reaches it through the AWS SDK's own settings (AWS_ENDPOINT_URL_S3), exactly as it would reach AWS,
MinIO or Ceph. Nothing is patched in process: the server is another process on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import urllib.error
import urllib.request

from runbooks import runner

from sqlhelpers import wait_until

BUCKET = "truthsource-records"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(endpoint: str) -> bool:
    """The server answers HTTP (any status: it is up)."""
    try:
        urllib.request.urlopen(endpoint, timeout=5).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


@contextlib.contextmanager
def s3_server():
    """moto's server on a free loopback port, with the AWS SDK's environment pointing at it and one
    bucket made; yields the endpoint. The server is stopped (by its pid) at the end."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: answers(endpoint), "the S3 server to answer",
                   stopped=lambda: server.poll() is not None and server.stderr.read().decode()[-2000:])
        env = {"AWS_ACCESS_KEY_ID": "truthsource-test", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret-key",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint}
        with runner.environment(env):
            import boto3

            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=60)


def client():
    import boto3

    return boto3.client("s3")
