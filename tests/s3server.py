"""A loopback S3 server (moto's server mode) for tests that go through s3fs for real.

Use it from a test module::

    from s3server import s3_server, bucket  # noqa: F401  (pytest fixtures)

    def test_x(s3_server, bucket):
        url = f"s3://{bucket}/x.zarr"
        fs = s3_server.filesystem()  # or s3fs through storage_options=s3_server.storage_options

The server binds 127.0.0.1 on a free port, lives for the test session (daemon thread,
stopped at the end of the session), and the AWS environment points every client at it
with dummy credentials, so nothing can reach a real endpoint or read the user's AWS
configuration.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field

import pytest

REGION = "us-east-1"
KEY = SECRET = "testing"


@dataclass
class S3Server:
    endpoint_url: str
    storage_options: dict = field(default_factory=dict)

    def filesystem(self):
        """A fresh s3fs filesystem on this server (no instance or listings cache)."""
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name by default) and return its name."""
        import boto3

        name = name or f"sazs-test-{uuid.uuid4().hex[:12]}"
        # boto3 rather than s3fs.mkdir: s3fs sends a LocationConstraint for us-east-1,
        # which S3 (and moto) reject.
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=KEY,
            aws_secret_access_key=SECRET,
        )
        client.create_bucket(Bucket=name)
        return name


def storage_options_for(endpoint_url: str) -> dict:
    return {
        "key": KEY,
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": REGION},
        # Every filesystem is built fresh and lists the server each time, so one test's
        # cached listing never hides another's writes.
        "skip_instance_cache": True,
        "use_listings_cache": False,
    }


def aws_env(endpoint_url: str) -> dict[str, str]:
    """Environment that sends any AWS client to the loopback server with dummy credentials."""
    return {
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_SESSION_TOKEN": KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ENDPOINT_URL_S3": endpoint_url,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("s3fs", reason="pip install s3fs (the s3 extra)")
    server_mod = pytest.importorskip("moto.server", reason="pip install 'moto[server]'")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_PROFILE", raising=False)
        for name, value in aws_env(endpoint).items():
            mp.setenv(name, value)
        try:
            yield S3Server(endpoint_url=endpoint, storage_options=storage_options_for(endpoint))
        finally:
            server.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh, empty bucket for one test."""
    return s3_server.make_bucket()
