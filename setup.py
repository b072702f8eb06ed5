"""Sourcebeam: event sourcing on Apache Beam.

Installs the packages Beam ships to remote workers with ``--setup_file``: the
schemas (with their .avsc files), the transforms, the pipelines and the
generators.
"""

import setuptools

setuptools.setup(
    name='sourcebeam',
    version='0.1.0',
    description='Event sourcing on Apache Beam: publish, order, join, project and replay event streams.',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['sourcebeam', 'sourcebeam.*']),
    package_data={'sourcebeam.schemas': ['*.avsc', 'history/*.avsc']},
    install_requires=[
        'apache-beam[gcp,aws]==2.77.0',
        'pyarrow==25.0.1',
        'fastavro==1.13.1',
    ],
)
