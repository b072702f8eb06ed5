"""The publish transform on a real Beam runner, and `run.py publish` end to end."""

import json
import os
import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.test_validation import BAD, good
from sourcebeam.transforms.publish import PublishEvents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def as_line(raw):
  return raw if isinstance(raw, bytes) else json.dumps(raw).encode()


def run_cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_publish_events_splits_every_line_into_exactly_one_output():
  lines = [as_line(good(event_id=f'e{i}', sequence=i)) for i in range(1, 6)] + [
      as_line(raw) for raw, _ in BAD]
  with TestPipeline() as p:
    result = p | beam.Create(lines) | PublishEvents()
    assert_that(result.published | 'Ids' >> beam.Map(lambda e: e['event_id']),
                equal_to([f'e{i}' for i in range(1, 6)]), label='published')
    assert_that(result.dead_letters | 'Reasons' >> beam.Map(lambda d: bool(d['reason'])),
                equal_to([True] * len(BAD)), label='dead')


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


def test_publish_cli_reads_a_glob_and_an_empty_file(tmp_path):
  (tmp_path / 'a.jsonl').write_bytes(as_line(good()) + b'\n')
  (tmp_path / 'b.jsonl').write_bytes(b'')
  out = tmp_path / 'out'
  proc = run_cli('publish', '--input', str(tmp_path / '*.jsonl'), '--out', str(out))
  assert proc.returncode == 0, proc.stderr
  summary = json.loads((out / 'summary.json').read_text())
  assert (summary['in'], summary['published'], summary['dead_lettered']) == (1, 1, 0)


def test_publish_cli_on_only_an_empty_file(tmp_path):
  (tmp_path / 'empty.jsonl').write_bytes(b'')
  proc = run_cli('publish', '--input', str(tmp_path / 'empty.jsonl'), '--out', str(tmp_path / 'o'))
  assert proc.returncode == 0, proc.stderr
  summary = json.loads((tmp_path / 'o' / 'summary.json').read_text())
  assert (summary['in'], summary['published'], summary['dead_lettered']) == (0, 0, 0)


def test_publish_cli_missing_input_is_one_line_and_exit_2(tmp_path):
  proc = run_cli('publish', '--input', str(tmp_path / 'nope.jsonl'), '--out', str(tmp_path / 'o'))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [f'error: input {tmp_path}/nope.jsonl does not exist (no file matches)']


def test_publish_cli_bad_arguments_exit_2(tmp_path):
  proc = run_cli('publish', '--out', str(tmp_path))
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  proc = run_cli('publish', '--input', 'x', '--out', str(tmp_path), '--max-event-bytes', '0')
  assert proc.returncode == 2
  assert proc.stderr.strip() == 'error: --max-event-bytes must be positive'


# ---------------------------------------------------------------------------
# Input the command must never lose (issue 15)

import run  # noqa: E402


def run_main(capsys, *argv):
  """``run.main`` in this process: (exit code, stdout, stderr)."""
  code = run.main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def raw_lines(n, start=1):
  return [as_line(good(event_id=f'e{i}', sequence=i)) for i in range(start, start + n)]


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
