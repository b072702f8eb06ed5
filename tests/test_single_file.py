"""WriteSingleFile: one text file per output, written part by part, with no grouping of lines."""

import os

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms import window

from sourcebeam.pipelines.options import pipeline_options
from sourcebeam.transforms.single_file import WriteSingleFile, _join_parts


def _lines(path):
  with open(path, encoding='utf-8') as f:
    text = f.read()
  assert text == '' or text.endswith('\n')
  return text.splitlines()


def test_every_line_once_in_one_file_and_no_part_left(tmp_path):
  lines = [f'{{"n": {i}, "text": "caf\u00e9 {i}"}}' for i in range(2500)] + ['']
  out = tmp_path / 'out' / 'lines.jsonl'
  with TestPipeline(options=pipeline_options([])) as p:
    _ = p | beam.Create(lines) | WriteSingleFile(str(out))
  assert sorted(_lines(out)) == sorted(lines)
  assert os.listdir(out.parent) == ['lines.jsonl']


def test_no_line_gives_an_empty_file(tmp_path):
  out = tmp_path / 'empty.jsonl'
  with TestPipeline(options=pipeline_options([])) as p:
    _ = p | beam.Create([]) | WriteSingleFile(str(out))
  assert out.read_bytes() == b''
  assert os.listdir(tmp_path) == ['empty.jsonl']


def test_lines_in_event_time_windows_all_go_to_the_file(tmp_path):
  out = tmp_path / 'hourly.jsonl'
  with TestPipeline(options=pipeline_options([])) as p:
    _ = (p | beam.Create([(f'line {i}', i * 1000.0) for i in range(10)])
         | beam.MapTuple(window.TimestampedValue)
         | beam.WindowInto(window.FixedWindows(3600))
         | WriteSingleFile(str(out)))
  assert sorted(_lines(out)) == sorted(f'line {i}' for i in range(10))


def test_the_write_has_no_grouping_of_lines(tmp_path):
  """What kept every line in a local runner's memory: WriteToText(num_shards=1) groups them."""
  p = beam.Pipeline(options=pipeline_options([]))
  _ = p | beam.Create(['a']) | 'Lines' >> WriteSingleFile(str(tmp_path / 'x.jsonl'))
  urns = [t.spec.urn for t in p.to_runner_api().components.transforms.values()]
  assert 'beam:transform:group_by_key:v1' not in urns


def test_parts_join_in_name_order_and_every_part_of_the_write_is_removed(tmp_path):
  prefix = str(tmp_path / '.out.jsonl.part-run1-')
  for name, text in (('b', 'two\n'), ('a', 'one\n'), ('orphan', 'retried bundle\n')):
    with open(prefix + name, 'w') as f:
      f.write(text)
  other = tmp_path / '.out.jsonl.part-run2-a'   # another write's part: not this one's
  other.write_text('kept\n')
  path = str(tmp_path / 'out.jsonl')
  assert _join_parts(None, path, prefix, [prefix + 'b', prefix + 'a']) == path
  assert _lines(path) == ['one', 'two']
  assert sorted(os.listdir(tmp_path)) == ['.out.jsonl.part-run2-a', 'out.jsonl']


def test_an_unbounded_input_is_written_by_beams_text_sink():
  p = beam.Pipeline(options=pipeline_options(['--streaming']))
  lines = (p | TestStream().add_elements(['a'])
           | beam.WindowInto(window.FixedWindows(60)))  # Beam's sink writes windows of a stream
  write = WriteSingleFile('/tmp/never-run.jsonl')
  _ = lines | write
  labels = [t.unique_name for t in p.to_runner_api().components.transforms.values()]
  assert any('WriteToText' in label or '/Write/' in label for label in labels)
