"""A real S3 protocol server on loopback for the tests; nothing else is contacted.

`S3Server` runs moto's standalone server (PyPI `moto[server]`, the S3 REST API over HTTP) in this
process on 127.0.0.1, on a port the OS picks. The `s3_server` fixture points every S3 client at it
(`AWS_ENDPOINT_URL`, and `AWS_ENDPOINT_URL_S3`, which pyarrow prefers when both are set);
`s3_bucket` makes a fresh bucket per test and yields its `s3://NAME` URI.

`CLIENT_ENV` (dummy credentials, region us-east-1, no EC2 metadata lookup) is applied by conftest
when the test session starts, not by the fixture: Ray workers keep the environment of the moment
Ray started, and a worker with no credentials would ask the EC2 metadata address for some. The
endpoint need not reach them: a pyarrow S3 filesystem carries it when pickled to a worker.
"""

from __future__ import annotations

import logging
import uuid

import boto3
import pytest
from moto.server import ThreadedMotoServer

CLIENT_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class S3Server:
    """moto's S3 server on 127.0.0.1 in a thread of this process; `endpoint` is its http URL."""

    def __init__(self):
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint = ""

    def start(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.stop()

    def create_bucket(self, name: str) -> str:
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=CLIENT_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CLIENT_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=CLIENT_ENV["AWS_DEFAULT_REGION"],
        )
        client.create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    """The loopback S3 server for the whole session, with the AWS client variables pointing at it."""
    server = S3Server()
    server.start()
    with pytest.MonkeyPatch.context() as env:
        for name, value in {**CLIENT_ENV, "AWS_ENDPOINT_URL": server.endpoint, "AWS_ENDPOINT_URL_S3": server.endpoint}.items():
            env.setenv(name, value)
        yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the loopback S3 server, as its `s3://NAME` URI."""
    return s3_server.create_bucket(f"fescale-{uuid.uuid4().hex[:12]}")
