"""Sourcebeam: event sourcing on Apache Beam.

``pip install .`` installs one package, ``sourcebeam`` (its library folders
``transforms/``, ``schemas/``, the commands ``pipelines/``, the demo application
``demo/``, ``generators/`` and ``benchmarks/`` are reached through the links in
``sourcebeam/``, so nothing lands at the top level of site-packages), and the
``sourcebeam`` command, which is ``run.py``.

Optional dependencies, as extras: ``kafka`` (confluent-kafka: the event writer,
fan-out to Kafka sinks, the hand-off's offset commits) and ``postgres`` (pg8000:
a view store on PostgreSQL). ``pip install '.[kafka,postgres]'`` for both.

Remote workers (Dataflow, a Flink cluster's worker pools) install Sourcebeam from
the sdist Beam builds of this file (``--setup_file``). A command whose pipeline
needs an extra on its workers sets ``SOURCEBEAM_WORKER_EXTRAS`` (e.g. ``kafka``)
while Beam builds that sdist; the sdist then records them (``WORKER_EXTRAS``) and
installs them wherever it is installed.

Every build starts from an empty ``build/lib``: a module deleted from the
sources never comes back from an earlier build.
"""

import os
import shutil

import setuptools
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
EXTRAS = {
    'kafka': ['confluent-kafka==2.16.1'],
    'postgres': ['pg8000==1.31.6'],
}
WORKER_EXTRAS_FILE = 'WORKER_EXTRAS'
WORKER_EXTRAS_ENV = 'SOURCEBEAM_WORKER_EXTRAS'


def _worker_requirements():
  """The extras an sdist built for remote workers asked for (none in a source checkout)."""
  path = os.path.join(HERE, WORKER_EXTRAS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    names = [n.strip() for n in f.read().split(',') if n.strip()]
  return [req for n in names for req in EXTRAS[n]]


class CleanBuildPy(build_py):
  """build_py from an empty build/lib."""

  def run(self):
    if os.path.isdir(self.build_lib):
      shutil.rmtree(self.build_lib)
    super().run()


class WorkerSdist(sdist):
  """An sdist that records $SOURCEBEAM_WORKER_EXTRAS, so its installs bring those extras."""

  def make_release_tree(self, base_dir, files):
    super().make_release_tree(base_dir, files)
    extras = [n.strip() for n in os.environ.get(WORKER_EXTRAS_ENV, '').split(',') if n.strip()]
    unknown = sorted(set(extras) - set(EXTRAS))
    if unknown:
      raise SystemExit(f'{WORKER_EXTRAS_ENV}: unknown extra(s) {unknown}; known: {sorted(EXTRAS)}')
    if extras:
      with open(os.path.join(base_dir, WORKER_EXTRAS_FILE), 'w', encoding='utf-8') as f:
        f.write(','.join(sorted(set(extras))))


setuptools.setup(
    name='sourcebeam',
    version='0.2.0',
    description='Event sourcing on Apache Beam: publish, order, join, project and replay event streams.',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['sourcebeam', 'sourcebeam.*']),
    package_data={'sourcebeam.schemas': ['*.avsc'], 'sourcebeam.demo': ['schemas/*.avsc']},
    install_requires=[
        'apache-beam[gcp,aws]==2.77.0',
        'pyarrow==25.0.1',
        'fastavro==1.13.1',
        'orjson==3.13.0',
    ] + _worker_requirements(),
    extras_require=EXTRAS,
    entry_points={'console_scripts': ['sourcebeam = sourcebeam.pipelines.command:main']},
    cmdclass={'build_py': CleanBuildPy, 'sdist': WorkerSdist},
)
