"""scripts/digest_outputs.py: the check that a change left every output of a run as it was."""

import contextlib
import importlib.util
import io
import json
import os
from typing import NamedTuple

from tests.demo import REG  # noqa: F401
from sourcebeam.transforms.archive_format import encode_avro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'digest_outputs.py')


def _run(out, run_id, lines, n_events=3):
  os.makedirs(os.path.join(out, 'replay'), exist_ok=True)
  with open(os.path.join(out, 'replay', 'view.jsonl'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump({'seconds': 1.5 if run_id == 'a' else 9.0, 'events': n_events,
               'paths': {'archive': os.path.join(out, 'archive')}}, f)
  events = [REG and {'event_id': f'e{i}', 'event_type': 'CartItemAdded', 'schema_version': 1,
                     'partition_key': 'u1', 'sequence': i + 1, 'event_time': 1_795_651_200_000 + i,
                     'origin': 'web', 'follows_from': None,
                     'data': {'user_id': 'u1', 'product_id': 'p1', 'quantity': 1}}
            for i in range(n_events)]
  rel = f'archive/hour=2026-11-26T00/bucket=000/events-{run_id}-0000.avro'
  os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
  with open(os.path.join(out, rel), 'wb') as f:
    f.write(encode_avro(events, REG, metadata={'sourcebeam.run_id': run_id}, name=rel))


def _script():
  """scripts/digest_outputs.py as a module (scripts/ is not a package): its main() in process."""
  spec = importlib.util.spec_from_file_location('digest_outputs', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class Ran(NamedTuple):
  returncode: int
  stdout: str


def _main(*argv) -> Ran:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = _script().main(list(argv))
  return Ran(code, out.getvalue())


def _digest(path, tmp_path, name):
  ran = _main(str(path))
  assert ran.returncode == 0, ran.stdout
  (tmp_path / name).write_text(ran.stdout)
  return str(tmp_path / name)


def _compare(a, b):
  return _main('--compare', a, b)


def test_two_runs_of_the_same_code_digest_the_same(tmp_path):
  _run(str(tmp_path / 'one'), 'a', ['{"k":1}', '{"k":2}'])
  _run(str(tmp_path / 'two'), 'b', ['{"k":1}', '{"k":2}'])
  proc = _compare(_digest(tmp_path / 'one', tmp_path, '1.json'),
                  _digest(tmp_path / 'two', tmp_path, '2.json'))
  assert proc.returncode == 0, proc.stdout
  assert '0 differ (all equal)' in proc.stdout


def test_a_changed_line_an_event_or_the_order_of_lines_is_reported(tmp_path):
  _run(str(tmp_path / 'one'), 'a', ['{"k":1}', '{"k":2}'])
  _run(str(tmp_path / 'two'), 'b', ['{"k":1}', '{"k":3}'], n_events=2)
  _run(str(tmp_path / 'three'), 'c', ['{"k":2}', '{"k":1}'])
  one = _digest(tmp_path / 'one', tmp_path, '1.json')
  proc = _compare(one, _digest(tmp_path / 'two', tmp_path, '2.json'))
  assert proc.returncode == 1
  assert 'DIFFERS: replay/view.jsonl' in proc.stdout
  assert 'DIFFERS: archive/hour=2026-11-26T00/bucket=000/events-RUN-0000.avro' in proc.stdout
  assert 'DIFFERS: summary.json' in proc.stdout  # its event count, not its timing
  proc = _compare(one, _digest(tmp_path / 'three', tmp_path, '3.json'))
  assert 'LINE ORDER: replay/view.jsonl' in proc.stdout
