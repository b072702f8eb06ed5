"""ProcessInOrder's streaming expansion on the Prism runner (built by scripts/install_tools.sh)."""

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from sourcebeam.pipelines.options import pipeline_options
from sourcebeam.pipelines.runners import prism_binary
from tests.test_ordering import Positions, ev
from sourcebeam.transforms.ordering import ProcessInOrder


@pytest.mark.integration
def test_streaming_expansion_on_prism():
  assert prism_binary(), 'no Prism binary: run scripts/install_tools.sh'
  events = [ev(k, s) for k in 'ab' for s in (3, 1, 2, 5, 5)]
  # Beam keeps one Prism job server per process, created with the first options that asked
  # for one; a DirectRunner pipeline earlier in this process (which tries Prism without
  # --prism_location, fails, and falls back) would leave a server that downloads from GitHub.
  options = pipeline_options(['--runner=PrismRunner', '--experiments=disable_prism_server_singleton'])
  with beam.Pipeline(options=options) as p:
    result = (p | beam.Create(events)
              | ProcessInOrder(Positions(), expansion='streaming', gap_timeout=5, gap_policy='skip'))
    assert_that(result.outputs, equal_to(
        [(k, (s, s)) for k in 'ab' for s in (1, 2, 3)] + [(k, (5, 4)) for k in 'ab']),
        label='outputs')
    assert_that(result.unprocessed | beam.Map(lambda r: (r['key'], r['sequence'], r['reason'])),
                equal_to([(k, 4, 'gap_timeout') for k in 'ab'] + [(k, 5, 'duplicate') for k in 'ab']),
                label='unprocessed')
    assert_that(result.status | beam.Map(lambda s: (s['key'], s['trigger'], s['received'])),
                equal_to([('a', 'final', 5), ('b', 'final', 5)]), label='status')
