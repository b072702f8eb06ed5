"""WriteCounts: every output's elements counted in the pipeline, empty outputs as 0."""

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.transforms import window

from sourcebeam.pipelines.options import pipeline_options
from sourcebeam.transforms.counting import WriteCounts, read_counts


def test_every_output_counted_windowed_or_empty_too(tmp_path):
  path = str(tmp_path / 'counts.json')
  with TestPipeline(options=pipeline_options([])) as p:
    many = p | 'Many' >> beam.Create(range(2345))
    split = many | beam.Partition(lambda n, k: n % 3, 3)  # several PCollections from one step
    hourly = (p | 'Hourly' >> beam.Create([(i, i * 600.0) for i in range(12)])
              | beam.MapTuple(window.TimestampedValue)
              | beam.WindowInto(window.FixedWindows(3600)))
    empty = p | 'Empty' >> beam.Create([])
    _ = {'many': many, 'thirds/0': split[0], 'thirds/1': split[1], 'hourly': hourly,
         'empty': empty} | WriteCounts(path)
  assert read_counts(path) == {'many': 2345, 'thirds/0': 782, 'thirds/1': 782, 'hourly': 12,
                               'empty': 0}


def test_the_counts_of_a_multi_process_run_add_up(tmp_path):
  """Partial counts come per bundle: with two worker processes the bundles are several."""
  path = str(tmp_path / 'counts.json')
  args = ['--direct_num_workers=2', '--direct_running_mode=multi_threading']
  with beam.Pipeline(options=pipeline_options(args)) as p:
    lines = p | beam.Create([str(i) for i in range(5000)]) | beam.Reshuffle()
    _ = {'lines': lines} | WriteCounts(path)
  assert read_counts(path) == {'lines': 5000}
