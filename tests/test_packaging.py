"""What `pip install .` installs, and what remote workers install from Beam's sdist.

Built with the project's own setup.py by pip and `python -m build` (fresh interpreters: the
build is the point), inspected as the files they are.
"""

from __future__ import annotations

import configparser
import glob
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from sourcebeam.pipelines.options import WORKER_EXTRAS_ENV, pipeline_options
from tests.demo import ROOT

pytestmark = pytest.mark.integration


def _source_copy(tmp_path):
  """The checkout's files (as a clean clone has them), to build from without touching it."""
  src = tmp_path / 'src'
  files = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                         cwd=ROOT, capture_output=True, check=True).stdout.decode().split('\0')
  for f in filter(None, files):
    target = src / f
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.islink(os.path.join(ROOT, f)):
      os.symlink(os.readlink(os.path.join(ROOT, f)), target)
    elif os.path.isfile(os.path.join(ROOT, f)):
      shutil.copy2(os.path.join(ROOT, f), target)
  return src


def test_the_wheel_installs_one_package_and_the_command_and_no_leftovers(tmp_path):
  src = _source_copy(tmp_path)
  stale = src / 'build' / 'lib' / 'sourcebeam' / 'transforms' / 'deleted_module.py'
  stale.parent.mkdir(parents=True)
  stale.write_text('LEFT = "from an earlier build"\n')
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                  '-q', '-w', str(tmp_path / 'dist'), str(src)], check=True, capture_output=True,
                 timeout=600)
  [wheel] = glob.glob(str(tmp_path / 'dist' / 'sourcebeam-*.whl'))
  names = zipfile.ZipFile(wheel).namelist()
  tops = {n.split('/')[0] for n in names}
  assert tops == {'sourcebeam', next(t for t in tops if t.endswith('.dist-info'))}
  for needed in ('sourcebeam/__init__.py', 'sourcebeam/transforms/app.py',
                 'sourcebeam/schemas/Envelope.avsc', 'sourcebeam/demo/schemas/CartItemAdded.avsc',
                 'sourcebeam/pipelines/command.py', 'sourcebeam/testing.py'):
    assert needed in names, needed
  assert not any('deleted_module' in n for n in names)  # build/ leftovers never come back
  info = next(t for t in tops if t.endswith('.dist-info'))
  entry_points = configparser.ConfigParser()
  entry_points.read_string(zipfile.ZipFile(wheel).read(f'{info}/entry_points.txt').decode())
  assert entry_points['console_scripts']['sourcebeam'] == 'sourcebeam.pipelines.command:main'
  metadata = zipfile.ZipFile(wheel).read(f'{info}/METADATA').decode()
  assert "Requires-Dist: confluent-kafka==2.16.1; extra == \"kafka\"" in metadata
  assert "Requires-Dist: pg8000==1.31.6; extra == \"postgres\"" in metadata


def test_an_sdist_built_for_workers_brings_the_extras_its_pipeline_needs(tmp_path, monkeypatch):
  # A Flink cluster with its own worker pools: the pipeline's workers install Sourcebeam from
  # the sdist of setup.py (--setup_file is added), and a fan-out to Kafka needs confluent-kafka.
  monkeypatch.delenv(WORKER_EXTRAS_ENV, raising=False)
  pipeline_options(['--runner=FlinkRunner', '--flink_master=localhost:8081',
                    '--environment_type=EXTERNAL', '--environment_config=localhost:50000'],
                   worker_extras=['kafka'])
  assert os.environ[WORKER_EXTRAS_ENV] == 'kafka'
  src = _source_copy(tmp_path)
  # What Beam's stager runs to build it (stager._build_setup_package), with that environment.
  subprocess.run([sys.executable, '-m', 'build', '--no-isolation', '--sdist', '--outdir',
                  str(tmp_path / 'sdist'), str(src)], check=True, capture_output=True, timeout=600,
                 env=dict(os.environ))
  [sdist] = glob.glob(str(tmp_path / 'sdist' / 'sourcebeam-*.tar.gz'))
  tar = tarfile.open(sdist)
  [marker] = [m for m in tar.getnames() if m.endswith('/WORKER_EXTRAS')]
  assert tar.extractfile(marker).read() == b'kafka'
  # Installed from that sdist, its requirements include the extra's.
  unpacked = tmp_path / 'unpacked'
  tar.extractall(unpacked)
  root = unpacked / marker.split('/')[0]
  subprocess.run([sys.executable, 'setup.py', '-q', 'egg_info'], cwd=root, check=True,
                 capture_output=True, timeout=300,
                 env={k: v for k, v in os.environ.items() if k != WORKER_EXTRAS_ENV})
  [requires] = glob.glob(str(root / '*.egg-info' / 'requires.txt'))
  first_section = io.StringIO(open(requires).read()).read().split('\n[')[0]
  assert 'confluent-kafka==2.16.1' in first_section.splitlines()
  assert 'pg8000==1.31.6' not in first_section.splitlines()
