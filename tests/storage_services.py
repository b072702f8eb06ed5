"""Real S3 and GCS endpoints on loopback for tests: moto's server and gcp-storage-emulator.

Both are real HTTP servers speaking the S3 REST protocol and the GCS JSON API;
Beam's filesystems talk to them through boto3 and google-cloud-storage exactly
as they would talk to the clouds, pointed there by the environment variables
that :mod:`pipelines.storage` reads. They run as threads of the test process
(no ports to clean up after a crash) on ports the OS picks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from typing import Dict, List, Optional

from sourcebeam.pipelines.live_stack import free_port  # noqa: F401 (the one free-port helper; tests import it from here)

S3_ENV = {
    'AWS_ACCESS_KEY_ID': 'sourcebeam-test',
    'AWS_SECRET_ACCESS_KEY': 'sourcebeam-test',
    'AWS_REGION': 'us-east-1',
    'AWS_DEFAULT_REGION': 'us-east-1',
}


class ServiceError(RuntimeError):
  """A local storage service could not be started or did not answer."""


class _Env:
  """Sets environment variables and puts the old values back on restore()."""

  def __init__(self):
    self._saved: Dict[str, Optional[str]] = {}

  def set(self, name: str, value: str) -> None:
    self._saved.setdefault(name, os.environ.get(name))
    os.environ[name] = value

  def restore(self) -> None:
    for name, value in self._saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
    self._saved.clear()


@dataclasses.dataclass
class StorageService:
  """A running endpoint: its URL, a bucket in it, and the paths and Beam args to use it."""
  scheme: str           # 's3' or 'gs'
  endpoint: str         # http://127.0.0.1:PORT
  bucket: str
  beam_args: List[str]  # extra pipeline options (the environment does the rest)

  def url(self, *parts: str) -> str:
    """``scheme://bucket/parts``."""
    return '/'.join([f'{self.scheme}://{self.bucket}'] + [p.strip('/') for p in parts])

  def fresh_prefix(self, name: str = 'archive') -> str:
    return self.url(f'{name}-{uuid.uuid4().hex[:8]}')


class S3Server:
  """moto's ThreadedMotoServer on loopback, with one bucket, configured via the environment."""

  def __init__(self, bucket: str = 'sourcebeam-test'):
    self.bucket = bucket
    self._server = None
    self._env = _Env()

  def start(self) -> StorageService:
    logging.getLogger('werkzeug').setLevel(logging.WARNING)  # no line per request
    try:
      from moto.server import ThreadedMotoServer
      self._server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
      self._server.start()
      host, port = self._server.get_host_and_port()
    except Exception as e:
      raise ServiceError(f'moto S3 server did not start: {e}') from e
    endpoint = f'http://{host}:{port}'
    for k, v in S3_ENV.items():
      self._env.set(k, v)
    self._env.set('SOURCEBEAM_S3_ENDPOINT', endpoint)
    try:
      import boto3
      client = boto3.client('s3', endpoint_url=endpoint, region_name=S3_ENV['AWS_REGION'])
      client.create_bucket(Bucket=self.bucket)
      client.head_bucket(Bucket=self.bucket)
    except Exception as e:
      self.stop()
      raise ServiceError(f'moto S3 server at {endpoint} did not answer: {e}') from e
    return StorageService('s3', endpoint, self.bucket, [])

  def stop(self) -> None:
    if self._server is not None:
      self._server.stop()
      self._server = None
    self._env.restore()


class GcsServer:
  """gcp-storage-emulator on loopback (in memory), with one bucket, via STORAGE_EMULATOR_HOST."""

  def __init__(self, bucket: str = 'sourcebeam-test'):
    self.bucket = bucket
    self._server = None
    self._env = _Env()

  def start(self) -> StorageService:
    port = free_port()
    try:
      from gcp_storage_emulator.server import create_server
      self._server = create_server('127.0.0.1', port, in_memory=True, default_bucket=self.bucket)
      self._server.start()
    except Exception as e:
      raise ServiceError(f'GCS emulator did not start on port {port}: {e}') from e
    endpoint = f'http://127.0.0.1:{port}'
    self._env.set('STORAGE_EMULATOR_HOST', endpoint)
    # The emulator needs no credentials; real ones would be sent to it (and refreshed).
    from sourcebeam.transforms.storage import DEFAULT_LOCAL_PROJECT, emulator_credentials_file
    self._env.set('GOOGLE_APPLICATION_CREDENTIALS', emulator_credentials_file())
    self._env.set('GOOGLE_CLOUD_PROJECT', DEFAULT_LOCAL_PROJECT)
    try:
      from google.cloud import storage
      client = storage.Client.create_anonymous_client()
      if client.lookup_bucket(self.bucket) is None:
        raise ServiceError(f'bucket {self.bucket} missing')
    except Exception as e:
      self.stop()
      raise ServiceError(f'GCS emulator at {endpoint} did not answer: {e}') from e
    return StorageService('gs', endpoint, self.bucket, [])

  def stop(self) -> None:
    if self._server is not None:
      self._server.stop()
      self._server = None
    self._env.restore()
