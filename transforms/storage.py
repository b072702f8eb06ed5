"""Storage options: where ``s3://`` and ``gs://`` paths go (real clouds or local emulators).

Beam reaches S3 and GCS through its ``FileSystems``; this module turns the
environment into the pipeline options that point them at the right endpoint,
so the same command works against a real cloud and against a local emulator.

Environment variables:

``SOURCEBEAM_S3_ENDPOINT``
    URL of an S3-compatible endpoint (moto's server, MinIO...), e.g.
    ``http://127.0.0.1:5000``. Becomes ``--s3_endpoint_url``. Unset: AWS.
``AWS_REGION`` (or ``AWS_DEFAULT_REGION``)
    Becomes ``--s3_region_name``.
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``
    Read by boto3 itself on every worker. They are deliberately *not* copied
    into pipeline options, where runners display and log them; pass
    ``--s3_access_key_id`` / ``--s3_secret_access_key`` explicitly if a remote
    worker has no other way to get credentials.
``STORAGE_EMULATOR_HOST``
    URL of a GCS emulator (``gcp-storage-emulator``, ``fake-gcs-server``), e.g.
    ``http://127.0.0.1:9023``. The google-cloud-storage client sends every
    request there. Beam's GCS filesystem always asks Google's default
    credential chain first and, when it finds nothing, retries with backoff for
    about 20 s per process before going anonymous. An emulator needs no
    credentials, so for an emulator this module points
    ``GOOGLE_APPLICATION_CREDENTIALS`` (unless already set) at a generated
    credentials file holding a dummy, never-expiring access token: the lookup
    succeeds at once, nothing is refreshed over the network, and the emulator
    ignores the token. It also sets ``GOOGLE_CLOUD_PROJECT`` (unless set) to
    ``SOURCEBEAM_GCP_PROJECT`` or ``sourcebeam-local``. Against real GCS
    (``STORAGE_EMULATOR_HOST`` unset) nothing is changed: the usual application
    default credentials apply.
``SOURCEBEAM_GCP_PROJECT``
    Project for the emulator case (above).

Command-line options given explicitly always win over the environment.

Plain Python outside a pipeline (tests, benchmarks, ``iter_archive``) uses
Beam's FileSystems too; :func:`use_storage_options` sets the options it needs
(a pipeline sets them itself when it is constructed).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import List, Optional, Sequence

from sourcebeam.transforms.errors import ConfigError

S3_ENDPOINT_ENV = 'SOURCEBEAM_S3_ENDPOINT'
GCS_EMULATOR_ENV = 'STORAGE_EMULATOR_HOST'
GCP_PROJECT_ENV = 'SOURCEBEAM_GCP_PROJECT'
DEFAULT_LOCAL_PROJECT = 'sourcebeam-local'

# An "authorized_user" credential with a token that never expires: google-auth
# uses the token as is (no refresh, no network); only an emulator accepts it.
_EMULATOR_CREDENTIALS = {
    'type': 'authorized_user',
    'client_id': 'sourcebeam-storage-emulator',
    'client_secret': 'unused',
    'refresh_token': 'unused',
    'token': 'sourcebeam-storage-emulator',
    'expiry': '2999-01-01T00:00:00Z',
}


def _has_option(args: Sequence[str], name: str) -> bool:
  return any(a == name or a.startswith(name + '=') for a in args)


def emulator_credentials_file() -> str:
  """Path of the dummy credentials file for a GCS emulator (written once per user)."""
  path = os.path.join(tempfile.gettempdir(), f'sourcebeam-gcs-emulator-{os.getuid()}.json')
  text = json.dumps(_EMULATOR_CREDENTIALS)
  try:
    with open(path, encoding='utf-8') as f:
      if f.read() == text:
        return path
  except OSError:
    pass
  tmp = f'{path}.{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)
  return path


def prepare_gcs_emulator_environment() -> bool:
  """When STORAGE_EMULATOR_HOST is set, make GCS access fast and anonymous-equivalent.

  Returns whether an emulator is configured. Idempotent.
  """
  if not os.environ.get(GCS_EMULATOR_ENV):
    return False
  os.environ.setdefault('GOOGLE_APPLICATION_CREDENTIALS', emulator_credentials_file())
  os.environ.setdefault(
      'GOOGLE_CLOUD_PROJECT', os.environ.get(GCP_PROJECT_ENV) or DEFAULT_LOCAL_PROJECT)
  return True


def storage_args(args: List[str]) -> List[str]:
  """``args`` plus the filesystem options the environment asks for."""
  args = list(args)
  endpoint = os.environ.get(S3_ENDPOINT_ENV)
  if endpoint and not _has_option(args, '--s3_endpoint_url'):
    args.append(f'--s3_endpoint_url={endpoint}')
  region = os.environ.get('AWS_REGION') or os.environ.get('AWS_DEFAULT_REGION')
  if region and not _has_option(args, '--s3_region_name'):
    args.append(f'--s3_region_name={region}')
  if prepare_gcs_emulator_environment() and not _has_option(args, '--project'):
    args.append(f'--project={os.environ["GOOGLE_CLOUD_PROJECT"]}')
  return args


def use_storage_options(beam_args: Optional[Sequence[str]] = None):
  """Set Beam's FileSystems options for plain-Python use outside a pipeline.

  Returns the PipelineOptions used. A pipeline sets these itself when it is
  built; code that reads or writes ``s3://`` / ``gs://`` paths directly (the
  archive's ``iter_archive``, a benchmark) calls this first.
  """
  from apache_beam.io.filesystems import FileSystems
  from apache_beam.options.pipeline_options import PipelineOptions
  options = PipelineOptions(storage_args(list(beam_args or [])))
  FileSystems.set_options(options)
  return options


# ---------------------------------------------------------------------------
# Preflight: fail in seconds, with one line, instead of minutes of retries


_PREFLIGHT_OK = set()


def preflight(path: str, options=None) -> None:
  """Check that the bucket of an ``s3://`` or ``gs://`` path can be reached; ConfigError if not.

  Beam's S3 filesystem retries a request that failed for want of credentials
  or a connection for about seven minutes, logging a traceback each time; the
  GCS client does much the same against an emulator that is not running. A
  command should instead say at once what is wrong. Local paths pass. A
  successful check is remembered for the rest of the process.
  """
  scheme, _, rest = path.partition('://')
  if scheme not in ('s3', 'gs') or not rest:
    return
  bucket = rest.split('/', 1)[0]
  if options is None:
    from apache_beam.options.pipeline_options import PipelineOptions
    options = PipelineOptions(storage_args([]))
  if scheme == 's3':
    _preflight_s3(bucket, options)
  else:
    _preflight_gcs(bucket)


def _preflight_s3(bucket: str, options) -> None:
  from apache_beam.options.pipeline_options import S3Options
  import boto3
  import botocore.exceptions
  from botocore.config import Config
  o = options.view_as(S3Options)
  where = o.s3_endpoint_url or 'AWS'
  key = ('s3', where, bucket)
  if key in _PREFLIGHT_OK:
    return
  session = boto3.session.Session()
  if not o.s3_access_key_id and session.get_credentials() is None:
    raise ConfigError(f'no AWS credentials for s3://{bucket}: set AWS_ACCESS_KEY_ID and '
                     'AWS_SECRET_ACCESS_KEY (or an AWS profile)')
  client = session.client(
      's3', endpoint_url=o.s3_endpoint_url, region_name=o.s3_region_name,
      aws_access_key_id=o.s3_access_key_id, aws_secret_access_key=o.s3_secret_access_key,
      aws_session_token=o.s3_session_token, verify=o.s3_verify, use_ssl=not o.s3_disable_ssl,
      config=Config(connect_timeout=5, read_timeout=15, retries={'max_attempts': 1}))
  try:
    client.head_bucket(Bucket=bucket)
  except botocore.exceptions.ClientError as e:
    code = str(e.response.get('Error', {}).get('Code', ''))
    if code in ('404', 'NoSuchBucket'):
      raise ConfigError(f'S3 bucket {bucket} does not exist (endpoint: {where})') from None
    if code in ('403', 'AccessDenied'):
      raise ConfigError(f'access to S3 bucket {bucket} denied (endpoint: {where})') from None
    # anything else (a redirect to another region...) is left to Beam's client
  except (botocore.exceptions.BotoCoreError, ValueError) as e:
    raise ConfigError(f'cannot reach S3 ({where}) for bucket {bucket}: '
                     f'{" ".join(str(e).split())}') from None
  _PREFLIGHT_OK.add(key)


def _preflight_gcs(bucket: str) -> None:
  import urllib.error
  import urllib.request
  emulator = os.environ.get(GCS_EMULATOR_ENV)
  if not emulator:
    return  # real GCS: Google's credential chain and Beam's client apply
  base = emulator if '://' in emulator else f'http://{emulator}'
  key = ('gs', base, bucket)
  if key in _PREFLIGHT_OK:
    return
  url = f'{base.rstrip("/")}/storage/v1/b/{bucket}'
  try:
    with urllib.request.urlopen(url, timeout=5):
      pass
  except urllib.error.HTTPError as e:
    if e.code == 404:
      raise ConfigError(f'GCS bucket {bucket} does not exist (emulator: {base})') from None
  except (urllib.error.URLError, OSError) as e:
    raise ConfigError(f'cannot reach the GCS emulator at {base} (STORAGE_EMULATOR_HOST): '
                     f'{getattr(e, "reason", e)}') from None
  _PREFLIGHT_OK.add(key)


# ---------------------------------------------------------------------------
# A shared S3 client for reads

_S3_CLIENTS = {}
_S3_LOCK = threading.Lock()


def s3_client(options):
  """A boto3 S3 client for ``options``' S3Options, created once per process and shared.

  Beam's S3 filesystem builds a new boto3 session and client for every
  operation (about 0.2 s each, mostly loading botocore's service model), which
  dominates reading an archive of many small files. boto3 clients are
  thread-safe, so one per configuration serves every read.
  """
  from apache_beam.options.pipeline_options import S3Options
  o = options.view_as(S3Options)
  key = (o.s3_endpoint_url, o.s3_region_name, o.s3_access_key_id, o.s3_secret_access_key,
         o.s3_session_token, o.s3_verify, o.s3_disable_ssl, o.s3_api_version)
  with _S3_LOCK:
    client = _S3_CLIENTS.get(key)
    if client is None:
      import boto3
      client = boto3.session.Session().client(
          's3', endpoint_url=o.s3_endpoint_url, region_name=o.s3_region_name,
          api_version=o.s3_api_version, use_ssl=not o.s3_disable_ssl, verify=o.s3_verify,
          aws_access_key_id=o.s3_access_key_id, aws_secret_access_key=o.s3_secret_access_key,
          aws_session_token=o.s3_session_token)
      _S3_CLIENTS[key] = client
  return client
