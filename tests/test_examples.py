"""The example applications, run as their users run them.

* The README's "Build your own application" walkthrough, command for command, in a copy of
  examples/orders outside the repository: publish, archive, replay, and the app's own tests.
* Both examples (orders: a view and a CRDT consumer; payments: a cross-key join) live from
  Kafka on Prism, on embedded Flink, and on the standalone Flink cluster with a Beam worker
  pool that does not have the app on its path (the app's code travels in the pipeline): the
  same outputs as the replay of their archive.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid

import pytest

import run
from tests.demo import ROOT
from tests.polling import wait_until

EXAMPLES = os.path.join(ROOT, 'examples')


def readme_block(name: str):
  """The commands of the README's code block marked ``<!-- example: NAME -->``."""
  text = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
  m = re.search(rf'<!-- example: {name} -->\s*```sh\n(.*?)```', text, re.S)
  assert m, f'README has no block marked example: {name}'
  lines = [l.split('#', 1)[0].strip() for l in m.group(1).splitlines()]
  return [l for l in lines if l]


@contextlib.contextmanager
def in_folder(path, monkeypatch):
  """Run in ``path`` as a user's project folder: its modules, not a cached one by that name."""
  monkeypatch.chdir(path)
  saved = {k: v for k, v in sys.modules.items() if k in ('orders', 'payments')}
  for k in saved:
    del sys.modules[k]
  try:
    yield
  finally:
    for k in ('orders', 'payments'):
      sys.modules.pop(k, None)
    sys.modules.update(saved)


def lines(path):
  with open(path, encoding='utf-8') as f:
    return sorted(l for l in f.read().splitlines() if l)


@pytest.mark.integration  # the team's own pytest run is a fresh interpreter in their folder
def test_the_readme_walkthrough_runs_as_written_outside_the_repository(tmp_path, monkeypatch):
  project = tmp_path / 'orders'
  shutil.copytree(os.path.join(EXAMPLES, 'orders'), project,
                  ignore=shutil.ignore_patterns('out', '__pycache__'))
  commands = readme_block('orders')
  assert commands[0] == 'cd examples/orders'
  ran = []
  with in_folder(project, monkeypatch):
    for command in commands[1:]:
      argv = shlex.split(command)
      if argv[0] == 'sourcebeam':
        assert run.main(argv[1:]) == 0, command
      elif argv[:3] == ['python', '-m', 'pytest']:
        # The team's own test run: a fresh interpreter in their folder, as they would start it.
        proc = subprocess.run([sys.executable, *argv[1:], '-p', 'no:cacheprovider'], cwd=project,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert ' passed' in proc.stdout and 'failed' not in proc.stdout
      else:
        raise AssertionError(f'the walkthrough has a command this test does not know: {command}')
      ran.append(argv[1] if argv[0] == 'sourcebeam' else 'pytest')
  assert ran == ['publish', 'replay', 'pytest']
  published = json.loads((project / 'out' / 'published' / 'summary.json').read_text())
  assert (published['published'], published['dead_lettered']) == (8, 1)
  replayed = json.loads((project / 'out' / 'replay' / 'summary.json').read_text())
  assert replayed['app'] == 'orders' and replayed['events'] == 8
  assert lines(project / 'out' / 'replay' / 'open_orders.jsonl') == [
      '{"customer_id":"c-1","open_orders":["o-2"]}',
      '{"customer_id":"c-2","open_orders":["o-5"]}',
      '{"customer_id":"c-3","open_orders":[]}']
  assert len(lines(project / 'out' / 'replay' / 'orders.jsonl')) == 5


def test_a_broken_app_is_exit_2_before_any_pipeline(tmp_path, monkeypatch, capsys):
  (tmp_path / 'broken.py').write_text('from sourcebeam import App\n'
                                      "app = App('broken', schemas='schemas')\n")
  (tmp_path / 'raw.jsonl').write_text('{}\n')
  (tmp_path / 'typo.py').write_text("import sourcebeam\nap = 1\n")
  cases = [('nowhere:app', "no module named 'nowhere'"),
           ('typo:app', "module typo has no attribute 'app'"),
           ('typo:ap', 'typo.ap is a int, not a sourcebeam.App'),
           ('broken:app', 'schema folder'),
           ('not a spec', 'must look like MODULE:ATTR')]
  with in_folder(tmp_path, monkeypatch):
    for spec, message in cases:
      code = run.main(['publish', '--app', spec, '--input', 'raw.jsonl', '--out', 'out'])
      err = capsys.readouterr().err.strip()
      assert code == 2 and len(err.splitlines()) == 1 and message in err, (spec, err)
      assert err.startswith('error: --app') and not (tmp_path / 'out').exists()


# --- live from Kafka, on every runner -------------------------------------------------------------

def _produce(kafka, topic, path):
  from confluent_kafka import Producer
  from sourcebeam.schemas.envelope import iso_to_millis
  producer = Producer({'bootstrap.servers': kafka, 'acks': 'all'})
  n = 0
  for raw in open(path, 'rb').read().splitlines():
    event = json.loads(raw)
    t = event.get('event_time')
    producer.produce(topic, key=str(n % 3).encode(), value=raw,
                     timestamp=iso_to_millis(t) if t else 0)  # 0: the broker's time
    n += 1
  assert producer.flush(60) == 0
  return n


@pytest.fixture(scope='module')
def replayed(tmp_path_factory):
  """Each example published, archived and replayed on the DirectRunner: the reference."""
  out = {}
  for name in ('orders', 'payments'):
    d = tmp_path_factory.mktemp(name)
    spec = f'{name}:app'
    with pytest.MonkeyPatch.context() as mp, in_folder(os.path.join(EXAMPLES, name), mp):
      assert run.main(['publish', '--app', spec, '--input', 'events.jsonl', '--out',
                       str(d / 'published'), '--archive', str(d / 'archive')]) == 0
      assert run.main(['replay', '--app', spec, '--archive', str(d / 'archive'), '--out',
                       str(d / 'replay')]) == 0
    out[name] = d
  return out


def _outputs(folder):
  return {os.path.relpath(os.path.join(d, f), folder): lines(os.path.join(d, f))
          for d, _, files in os.walk(folder) for f in files
          if f.endswith('.jsonl') and not f.startswith(('_', 'corrupt'))}


@contextlib.contextmanager
def worker_pool():
  """A Beam Python worker pool as a cluster would run it: in another folder, without the
  examples on its path (only Sourcebeam, installed in the venv)."""
  from tests.service_fixtures import free_port
  port = free_port()
  # It starts each worker with the `python` first on PATH: this venv's, which has Sourcebeam.
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH',)}
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
  proc = subprocess.Popen([sys.executable, '-m', 'apache_beam.runners.worker.worker_pool_main',
                           f'--service_port={port}'], cwd='/', env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    wait_until(lambda: _listening(port), 60, f'the worker pool to listen on {port}', interval=0.1,
               proc=proc)
    yield port
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def _listening(port: int) -> bool:
  import socket
  with socket.socket() as s:
    return s.connect_ex(('127.0.0.1', port)) == 0


RUNNERS = {
    'prism': lambda request: ['--runner=PrismRunner'],
    'embedded-flink': lambda request: ['--runner=FlinkRunner', '--flink_master=[local]'],
    'flink-cluster-worker-pool': lambda request: [
        '--runner=FlinkRunner', f'--flink_master={request.getfixturevalue("flink_cluster")}',
        '--environment_type=EXTERNAL'],
}


@pytest.mark.integration
@pytest.mark.parametrize('runner', sorted(RUNNERS))
@pytest.mark.parametrize('name', ['orders', 'payments'])
def test_an_app_from_kafka_equals_its_replay_on_every_runner(name, runner, replayed, kafka, tmp_path,
                                                            request, monkeypatch):
  topic = f'{name}-{uuid.uuid4().hex[:8]}'
  from tests.service_fixtures import create_topic
  create_topic(kafka, topic, partitions=3)
  n = _produce(kafka, topic, os.path.join(EXAMPLES, name, 'events.jsonl'))
  args = RUNNERS[runner](request)
  pool = worker_pool() if runner.endswith('worker-pool') else contextlib.nullcontext()
  with pool as port, in_folder(os.path.join(EXAMPLES, name), monkeypatch):
    if port:
      args.append(f'--environment_config=localhost:{port}')
    out = tmp_path / 'stream'
    assert run.main(['stream', '--app', f'{name}:app', '--source', f'kafka://{kafka}/{topic}',
                     '--max-records', str(n), '--out', str(out), f'--group-id=g-{topic}',
                     *args]) == 0
  want = _outputs(replayed[name] / 'replay')
  got = _outputs(out / 'consumers')
  assert want and sorted(got) == sorted(want)
  for output, rows in want.items():
    assert got[output] == rows, output
  assert lines(out / 'published.jsonl') == lines(replayed[name] / 'published' / 'published.jsonl')
