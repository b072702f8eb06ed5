"""Every `run.py` pipeline builds a Dataflow job by dry run, without contacting Google.

Each test runs the real command line with ``--runner=DataflowRunner --dry_run=True``
and checks the job it prints (``pipelines.cli.describe_job``): batch or streaming,
the pipeline's steps, Beam's Python SDK container with Sourcebeam staged as an sdist
of setup.py, and for the Kafka pipelines Beam's Java SDK container with the IO
expansion service jar staged. Archives on ``gs://`` live on the GCS emulator (the
manifest is read while the job is built), so nothing here reaches Google, and the
Kafka source names a port nothing listens on (building the job never dials it). The
commands run in this process; a job that is built stages Sourcebeam as an sdist, which Beam
builds with ``python setup.py sdist`` in a process of its own, and the Kafka pipelines' tests
start Beam's Java expansion service, so those are integration tests.
"""

import json

import pytest

from sourcebeam.generators import retail, taxi
from sourcebeam.generators.jsonl import encode_line
from tests.cli import run_cli

DRY_RUN = ['--runner=DataflowRunner', '--project=sourcebeam-dry-run', '--region=us-central1',
           '--temp_location=gs://sourcebeam-dry-run/tmp', '--sdk_location=container',
           '--dry_run=True']
PYTHON_IMAGE = 'gcr.io/cloud-dataflow/v1beta3/beam_python3.11_sdk:2.77.0'
JAVA_IMAGE = 'apache/beam_java17_sdk:2.70.0'
NOBODY = 'kafka://127.0.0.1:1/raw'


def dry_run(*args, expect_rc=0):
  proc = run_cli(*args)
  assert proc.returncode == expect_rc, proc.stderr[-3000:]
  if expect_rc:
    return proc.stderr
  assert 'dry run: the job was built and validated, not run' in proc.stderr
  job = json.loads(proc.stdout.strip().splitlines()[-1])
  python = [e for e in job['environments'] if e['container_image'] == PYTHON_IMAGE]
  assert len(python) == 1, job['environments']
  # Sourcebeam reaches the workers as the sdist Beam builds from setup.py.
  assert 'workflow.tar.gz' in python[0]['staged']
  assert all(e['urn'] == 'beam:env:docker:v1' for e in job['environments'])
  return job


def java_environment(job):
  java = [e for e in job['environments'] if e['container_image'] == JAVA_IMAGE]
  assert len(java) == 1, job['environments']
  return java[0]


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  path = tmp_path_factory.mktemp('raw') / 'raw.jsonl'
  path.write_bytes(b'\n'.join(encode_line(e) for e in retail.retail_events(200, seed=3)) + b'\n')
  return path


@pytest.fixture(scope='module')
def gcs_archive(raw, gcs_service):
  """An archive in a bucket of the GCS emulator, written by `run.py publish`."""
  archive = gcs_service.fresh_prefix('archive')
  proc = run_cli('publish', '--input', str(raw), '--out', gcs_service.fresh_prefix('published'),
                 '--archive', archive, *gcs_service.beam_args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return archive


@pytest.mark.integration  # Beam builds the sdist it stages with `python setup.py sdist`
def test_publish_with_a_local_input_builds_a_batch_job(raw, tmp_path):
  out = tmp_path / 'published'
  job = dry_run('publish', '--input', str(raw), '--out', str(out), '--job_name=sourcebeam-publish',
                *DRY_RUN)
  assert job['job_name'] == 'sourcebeam-publish' and job['type'] == 'JOB_TYPE_BATCH'
  assert {'ReadRaw', 'Publish', 'WritePublished', 'WriteDeadLetters', 'Counts'} <= set(job['steps'])
  # Nothing ran, so nothing was written.
  assert not list(out.rglob('*.jsonl')) and not (out / 'summary.json').exists()


def test_replay_of_an_archive_on_gcs_builds_a_batch_job(gcs_archive, gcs_service):
  job = dry_run('replay', '--archive', gcs_archive, '--out', gcs_service.fresh_prefix('replay'),
                *gcs_service.beam_args, *DRY_RUN)
  assert job['type'] == 'JOB_TYPE_BATCH'
  assert {'ReplayArchive', 'WriteOutputs', 'CorruptJson', 'Counts'} <= set(job['steps'])


@pytest.mark.integration  # starts the Java expansion service
def test_bounded_stream_from_kafka_builds_a_job_with_javas_kafka_io(tmp_path):
  job = dry_run('stream', '--source', NOBODY, '--max-records', '100', '--publish-topic',
                'published', '--out', 'gs://sourcebeam-dry-run/stream', *DRY_RUN)
  assert job['type'] == 'JOB_TYPE_BATCH'
  assert {'ReadKafka', 'Publish', 'PublishToKafka', 'Consumers', 'WriteOutputs'} <= set(job['steps'])
  # KafkaIO runs in Beam's Java container, which gets the expansion service's jar.
  staged = java_environment(job)['staged']
  assert len(staged) == 1 and staged[0].startswith('beam-sdks-java-io-expansion-service-2.70.0')


@pytest.mark.integration  # starts the Java expansion service
def test_live_stream_that_archives_to_gcs_builds_a_streaming_job(gcs_service):
  job = dry_run('stream', '--source', NOBODY, '--out', gcs_service.fresh_prefix('live'),
                '--archive', gcs_service.fresh_prefix('live-archive'), *gcs_service.beam_args,
                *DRY_RUN)
  assert job['type'] == 'JOB_TYPE_STREAMING'
  assert {'ReadKafka', 'Publish', 'ArchiveLive'} <= set(job['steps'])
  java_environment(job)


@pytest.mark.integration  # starts the Java expansion service
def test_fanout_and_taxi_pipelines_build_jobs(gcs_service, tmp_path):
  subscribers = tmp_path / 'subscribers.json'
  subscribers.write_text(json.dumps({'subscribers': [
      {'name': 'carts', 'event_types': ['CartItemAdded'],
       'sink': gcs_service.fresh_prefix('carts')}]}))
  job = dry_run('fanout', '--subscribers', str(subscribers), '--source', NOBODY,
                '--max-records', '10', '--out', gcs_service.fresh_prefix('fanout'),
                *gcs_service.beam_args, *DRY_RUN)
  assert job['type'] == 'JOB_TYPE_BATCH' and 'ReadKafka' in job['steps']
  java_environment(job)
  rides, fares = tmp_path / 'rides.jsonl', tmp_path / 'fares.jsonl'
  taxi.write_rides_and_fares(50, str(rides), str(fares), seed=1)
  job = dry_run('taxi', 'join', '--rides', str(rides), '--fares', str(fares),
                '--out', 'gs://sourcebeam-dry-run/taxi', *DRY_RUN)
  assert 'Join' in job['steps']


@pytest.mark.cli
def test_a_dry_run_without_a_temp_location_is_exit_2(raw):
  args = [a for a in DRY_RUN if not a.startswith('--temp_location')]
  err = dry_run('publish', '--input', str(raw), '--out', 'gs://sourcebeam-dry-run/p', *args,
                expect_rc=2)
  assert err.strip().splitlines()[-1] == (
      'error: a Dataflow dry run needs --temp_location=gs://BUCKET/tmp (nothing is written '
      'there; without it Beam asks GCS for a default bucket)')


@pytest.mark.cli
def test_a_real_dataflow_run_refuses_local_paths(raw):
  args = [a for a in DRY_RUN if a != '--dry_run=True']
  err = dry_run('publish', '--input', str(raw), '--out', 'gs://sourcebeam-dry-run/p', *args,
                expect_rc=2)
  assert err.strip().splitlines()[-1] == (
      f'error: --input {raw} is a local path, which Dataflow workers cannot see: use gs://BUCKET/...')
