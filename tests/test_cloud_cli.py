"""`run.py publish --archive` and `run.py replay` against real S3 and GCS endpoints on loopback.

The raw input is read from the bucket too, so the whole path a user takes with
a cloud archive is exercised: input in the bucket, archive in the bucket,
replay from the bucket.
"""

import json

import pytest

from sourcebeam.generators import retail
from sourcebeam.generators.jsonl import encode_line
from tests.cli import run_cli
from tests.test_validation import good


def upload(url: str, data: bytes) -> None:
  from apache_beam.io.filesystems import FileSystems
  from sourcebeam.transforms.storage import use_storage_options
  use_storage_options()
  with FileSystems.create(url) as f:
    f.write(data)


@pytest.mark.integration  # the service is asked for by name (request.getfixturevalue)
@pytest.mark.parametrize('service_name', ['s3_service', 'gcs_service'])
def test_publish_to_a_cloud_archive_and_replay_it(service_name, request, tmp_path):
  service = request.getfixturevalue(service_name)
  lines = [encode_line(e) for e in retail.retail_events(300, seed=7)] + [b'{"broken": ']
  raw_url = service.fresh_prefix('raw') + '/day.jsonl'
  upload(raw_url, b'\n'.join(lines) + b'\n')
  archive = service.fresh_prefix('archive')
  out = tmp_path / 'published'
  proc = run_cli('publish', '--input', raw_url, '--out', str(out), '--archive', archive,
                 *service.beam_args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((out / 'summary.json').read_text())
  assert (summary['in'], summary['published'], summary['dead_lettered']) == (301, 300, 1)
  assert summary['archived'] == 300

  proc = run_cli('replay', '--archive', archive, '--out', str(tmp_path / 'replay'), *service.beam_args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  replayed = json.loads((tmp_path / 'replay' / 'summary.json').read_text())
  assert replayed['events'] == 300
  assert replayed['outputs']['retail/cart'] > 0


@pytest.mark.integration  # the service is asked for by name (request.getfixturevalue)
@pytest.mark.parametrize('service_name', ['s3_service', 'gcs_service'])
def test_a_missing_cloud_input_is_exit_2(service_name, request, tmp_path):
  service = request.getfixturevalue(service_name)
  proc = run_cli('publish', '--input', service.url('nothing-here', 'raw.jsonl'), '--out',
                 str(tmp_path), *service.beam_args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
