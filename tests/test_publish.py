"""The publish transform on a real Beam runner, and `run.py publish` end to end."""

import json
import os
import sys

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.demo import DEMO_SCHEMAS, REG  # noqa: F401
from tests.test_validation import BAD, good
from sourcebeam.transforms.publish import PublishEvents
from tests.cli import run_cli


def as_line(raw):
  return raw if isinstance(raw, bytes) else json.dumps(raw).encode()


def test_publish_events_splits_every_line_into_exactly_one_output():
  lines = [as_line(good(event_id=f'e{i}', sequence=i)) for i in range(1, 6)] + [
      as_line(raw) for raw, _ in BAD]
  with TestPipeline() as p:
    result = p | beam.Create(lines) | PublishEvents(REG)
    assert_that(result.published | 'Ids' >> beam.Map(lambda e: e['event_id']),
                equal_to([f'e{i}' for i in range(1, 6)]), label='published')
    assert_that(result.dead_letters | 'Reasons' >> beam.Map(lambda d: bool(d['reason'])),
                equal_to([True] * len(BAD)), label='dead')


@pytest.mark.cli
def test_publish_cli_accounts_for_every_line(tmp_path):
  raw = tmp_path / 'raw.jsonl'
  good_lines = [as_line(good(event_id=f'e{i}', sequence=i)) for i in range(1, 4)]
  bad_lines = [as_line(r) for r, _ in BAD if b'\n' not in as_line(r) and as_line(r).strip()]
  raw.write_bytes(b'\n'.join(good_lines + bad_lines) + b'\n')
  out = tmp_path / 'out'
  proc = run_cli('publish', '--input', str(raw), '--out', str(out))
  assert proc.returncode == 0, proc.stderr
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['in'] == len(good_lines) + len(bad_lines)
  assert summary['published'] == 3
  assert summary['dead_lettered'] == len(bad_lines)
  assert summary['in'] == summary['published'] + summary['dead_lettered']
  published = [json.loads(l) for l in (out / 'published.jsonl').read_text().splitlines()]
  assert sorted(e['event_id'] for e in published) == ['e1', 'e2', 'e3']
  dead = [json.loads(l) for l in (out / 'dead_letters.jsonl').read_text().splitlines()]
  reasons = ' | '.join(d['reason'] for d in dead)
  for raw_case, reason in BAD:
    if as_line(raw_case) in bad_lines:
      assert reason in reasons
  assert all(d['source'].endswith('raw.jsonl') for d in dead)


@pytest.mark.cli
def test_publish_cli_reads_a_glob_and_an_empty_file(tmp_path):
  (tmp_path / 'a.jsonl').write_bytes(as_line(good()) + b'\n')
  (tmp_path / 'b.jsonl').write_bytes(b'')
  out = tmp_path / 'out'
  proc = run_cli('publish', '--input', str(tmp_path / '*.jsonl'), '--out', str(out))
  assert proc.returncode == 0, proc.stderr
  summary = json.loads((out / 'summary.json').read_text())
  assert (summary['in'], summary['published'], summary['dead_lettered']) == (1, 1, 0)


@pytest.mark.cli
def test_publish_cli_on_only_an_empty_file(tmp_path):
  (tmp_path / 'empty.jsonl').write_bytes(b'')
  proc = run_cli('publish', '--input', str(tmp_path / 'empty.jsonl'), '--out', str(tmp_path / 'o'))
  assert proc.returncode == 0, proc.stderr
  summary = json.loads((tmp_path / 'o' / 'summary.json').read_text())
  assert (summary['in'], summary['published'], summary['dead_lettered']) == (0, 0, 0)


@pytest.mark.cli
def test_publish_cli_missing_input_is_one_line_and_exit_2(tmp_path):
  proc = run_cli('publish', '--input', str(tmp_path / 'nope.jsonl'), '--out', str(tmp_path / 'o'))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [f'error: input {tmp_path}/nope.jsonl does not exist (no file matches)']


@pytest.mark.cli
def test_publish_cli_bad_arguments_exit_2(tmp_path):
  proc = run_cli('publish', '--out', str(tmp_path))
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  proc = run_cli('publish', '--input', 'x', '--out', str(tmp_path), '--max-event-bytes', '0')
  assert proc.returncode == 2
  assert proc.stderr.strip() == 'error: --max-event-bytes must be positive'


# ---------------------------------------------------------------------------
# Input the command must never lose (issue 15, findings 2, 7 and 11)

import glob  # noqa: E402
import io  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402


def run_main(capsys, *argv):
  """``run.main`` in this process: (exit code, stdout, stderr)."""
  return run_cli(*argv)


def raw_lines(n, start=1):
  return [as_line(good(event_id=f'e{i}', sequence=i)) for i in range(start, start + n)]


@pytest.mark.cli
@pytest.mark.parametrize('name', ['-', '/dev/stdin'])
def test_publish_reads_piped_stdin(tmp_path, name):
  """`cat raw.jsonl | run.py publish --input /dev/stdin` published "0 of 0 events", exit 0."""
  data = b'\n'.join(raw_lines(20)) + b'\n'
  out = tmp_path / 'out'
  proc = run_cli('publish', '--input', name, '--out', str(out), stdin=data)  # stdin: a real pipe
  assert proc.returncode == 0, proc.stderr
  summary = json.loads((out / 'summary.json').read_text())
  assert (summary['in'], summary['published']) == (20, 20)
  assert summary['input'] == {'given': name, 'spooled_bytes': len(data)}
  assert f'read {len(data)} bytes from {"stdin" if name == "-" else name}' in proc.stderr


@pytest.mark.cli
def test_publish_reads_a_named_pipe(tmp_path, capsys):
  fifo = tmp_path / 'raw.fifo'
  os.mkfifo(fifo)
  lines = raw_lines(30) + [b'not json']

  def writer():
    with open(fifo, 'wb') as f:
      for line in lines:
        f.write(line + b'\n')

  t = threading.Thread(target=writer, daemon=True)
  t.start()
  code, _, err = run_main(capsys, 'publish', '--input', str(fifo), '--out', str(tmp_path / 'o'))
  t.join(5)
  assert code == 0, err
  summary = json.loads((tmp_path / 'o' / 'summary.json').read_text())
  assert (summary['in'], summary['published'], summary['dead_lettered']) == (31, 30, 1)
  dead = json.loads((tmp_path / 'o' / 'dead_letters.jsonl').read_text())
  assert dead['source'] == str(fifo)  # the pipe's name, not the temporary copy's
  copy = err.split('into a temporary file (', 1)[1].split(')', 1)[0]
  assert copy.endswith('input.jsonl') and not os.path.exists(copy)  # deleted after the run


@pytest.mark.cli
def test_publish_refuses_a_pipe_inside_a_glob_and_a_terminal_stdin(tmp_path, capsys, monkeypatch):
  (tmp_path / 'a.jsonl').write_bytes(raw_lines(1)[0] + b'\n')
  os.mkfifo(tmp_path / 'b.jsonl')
  code, _, err = run_main(capsys, 'publish', '--input', str(tmp_path / '*.jsonl'),
                          '--out', str(tmp_path / 'o'))
  assert code == 2
  assert err.strip().splitlines() == [
      f'error: input {tmp_path}/b.jsonl (matched by {tmp_path}/*.jsonl) is a pipe or device: '
      'give it alone as --input']
  master, slave = os.openpty()
  try:
    monkeypatch.setattr(sys, 'stdin', io.TextIOWrapper(io.FileIO(slave, 'rb', closefd=False)))
    code, _, err = run_main(capsys, 'publish', '--input', '-', '--out', str(tmp_path / 'o'))
  finally:
    os.close(master)
    os.close(slave)
  assert code == 2
  assert err.strip().startswith('error: --input - reads stdin, which is a terminal')


@pytest.mark.cli
def test_publish_directory_input_is_exit_2_at_once(tmp_path, capsys, monkeypatch):
  """It ran 14 s and ended exit 1 with IsADirectoryError, leaving beam-temp-* folders."""
  (tmp_path / 'raw').mkdir()
  (tmp_path / 'raw' / 'a.jsonl').write_bytes(raw_lines(1)[0] + b'\n')
  monkeypatch.chdir(tmp_path)
  started = time.monotonic()
  code, out, err = run_main(capsys, 'publish', '--input', str(tmp_path / 'raw'),
                            '--out', str(tmp_path / 'o'))
  assert code == 2
  assert err.strip().splitlines() == [
      f'error: input {tmp_path}/raw is a directory: give a file or a glob '
      f'(e.g. {tmp_path}/raw/*.jsonl)']
  assert time.monotonic() - started < 5  # refused before a pipeline was built
  assert not glob.glob(str(tmp_path / '**' / 'beam-temp-*'), recursive=True)
  assert not (tmp_path / 'o').exists()


@pytest.mark.cli
def test_publish_cuts_a_long_line_off_while_reading(tmp_path, capsys):
  """A 16 MB line took 35 s and a 50 MB one did not finish: the whole line was read first."""
  limit = 1000
  long = b'{"event_type": "CartItemAdded", "pad": "' + b'x' * (3 * 1024 * 1024) + b'"}'
  raw = tmp_path / 'raw.jsonl'
  raw.write_bytes(b'\n'.join(raw_lines(2) + [long] + raw_lines(2, start=3)) + b'\n')
  code, _, err = run_main(capsys, 'publish', '--input', str(raw), '--out', str(tmp_path / 'o'),
                          '--max-event-bytes', str(limit))
  assert code == 0, err
  summary = json.loads((tmp_path / 'o' / 'summary.json').read_text())
  assert (summary['in'], summary['published'], summary['dead_lettered']) == (5, 4, 1)
  dead = json.loads((tmp_path / 'o' / 'dead_letters.jsonl').read_text())
  assert dead['raw'].encode() == long[:limit]
  assert dead['reason'] == (f'event is {len(long)} bytes, over the limit of {limit} bytes '
                            f'(--max-event-bytes): cut off while reading, the first {limit} '
                            'bytes kept')
  assert (dead['line_bytes'], dead['kept_bytes'], dead['source']) == (len(long), limit, str(raw))
