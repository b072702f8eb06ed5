"""The main job and the replay command end to end, as a user runs them."""

import glob
import json

import pytest

from tests.cli import run_cli

pytestmark = pytest.mark.cli


@pytest.fixture
def main_job(sample_day):
  """`run.py --out DIR --events 1500 --taxi-rides 200 --rider-trips 4` (tests/conftest.py)."""
  return sample_day.out, sample_day.proc


def test_main_job_accounts_for_every_event(main_job):
  out, _ = main_job
  summary = json.loads((out / 'summary.json').read_text())
  pub, rep = summary['publish'], summary['replay']
  assert pub['in'] == pub['published'] + pub['dead_lettered'] + pub['duplicates_dropped']
  assert pub['dead_lettered'] > 0  # the sample day carries a few malformed lines on purpose
  # ... and re-delivered ones: dropped at the publishing boundary, never published twice.
  assert pub['duplicates_dropped'] > 0 and pub['held_on_gap'] == 0
  # The malformed lines leave holes in the raw stream; none is left in the published one,
  # so every published event is applied: nothing held on a gap, no duplicate to drop.
  assert pub['gaps'] > 0 and pub['missing_raw_sequences'] >= pub['gaps']
  assert rep['held_on_gap'] == 0 and rep['held_on_gap_keys'] == 0
  assert rep['unprocessed'] == {} and rep['unknown_type'] == 0 and rep['unclaimed'] == 0
  assert pub['archived'] == pub['published'] == rep['events']
  assert rep['corrupt_files'] == []
  raw_lines = sum(len(open(f, 'rb').read().splitlines()) for f in glob.glob(str(out / 'input' / '*.jsonl')))
  assert pub['in'] == raw_lines
  published = (out / 'published' / 'published.jsonl').read_text().splitlines()
  assert len(published) == pub['published']


def test_main_job_writes_every_consumers_output(main_job):
  out, _ = main_job
  outputs = json.loads((out / 'summary.json').read_text())['outputs']
  for name in ('retail/cart', 'retail/catalog', 'retail/recently_viewed', 'retail/frequently_viewed',
               'taxi/joined', 'taxi/alerts', 'taxi/hourly_tips', 'taxi/rides_in_nyc',
               'riders/rider_located', 'riders/occupancy', 'riders/zone_waiting'):
    assert outputs[name] > 0, name
    path = out / 'replay' / f'{name}.jsonl'
    assert len(path.read_text().splitlines()) == outputs[name], name
  assert (out / 'replay' / 'retail' / 'cart.parquet').exists()
  # The published stream has no duplicates and no holes: the consumers apply every event.
  assert (out / 'replay' / 'unprocessed.jsonl').read_text() == ''
  published = [json.loads(l) for l in (out / 'published' / 'published.jsonl').read_text().splitlines()]
  from tests.demo import REG
  by_key = {}
  for e in published:  # numbered per key space and key
    by_key.setdefault(REG.ordering_key(e), []).append(e['sequence'])
  assert all(sorted(seqs) == list(range(1, len(seqs) + 1)) for seqs in by_key.values())
  assert all(isinstance(e['raw_sequence'], int) for e in published)


def test_main_job_shows_progress_and_a_human_summary(main_job):
  _, proc = main_job
  assert '[1/4] generating a sample day' in proc.stderr
  assert '[4/4] writing the summary' in proc.stderr
  assert 'Sourcebeam main job done' in proc.stdout
  assert 'not applied: nothing' in proc.stdout
  assert 'Traceback' not in proc.stderr


def test_replay_reports_a_corrupt_archive_file_with_its_path(main_job, tmp_path):
  out, _ = main_job
  archive = tmp_path / 'archive'
  import shutil
  shutil.copytree(out / 'archive', archive)
  victim = sorted(glob.glob(str(archive / 'hour=*' / 'bucket=*' / 'events-*.avro')))[0]
  with open(victim, 'r+b') as f:
    data = f.read()
    f.seek(0)
    f.write(data[:len(data) // 2])
    f.truncate()
  proc = run_cli('replay', '--archive', str(archive), '--out', str(tmp_path / 'replay'))
  assert proc.returncode == 1
  assert f'corrupt archive file {victim}' in proc.stderr
  assert 'Traceback' not in proc.stderr
  summary = json.loads((tmp_path / 'replay' / 'summary.json').read_text())
  assert [c['path'] for c in summary['corrupt_files']] == [victim]


def test_replay_of_a_missing_archive_is_exit_2(tmp_path):
  proc = run_cli('replay', '--archive', str(tmp_path / 'none'), '--out', str(tmp_path / 'o'))
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith('error: archive')
  assert len(proc.stderr.strip().splitlines()) == 1


def test_help_explains_every_command():
  proc = run_cli('--help')
  assert proc.returncode == 0
  for command in ('generate', 'publish', 'replay', 'keys', 'taxi', 'bench'):
    assert command in proc.stdout
  for command in ('main', 'publish', 'replay'):
    sub = run_cli(command, '--help')
    assert sub.returncode == 0 and '--out' in sub.stdout
