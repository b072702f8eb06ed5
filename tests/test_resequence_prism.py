"""Resequence on the Prism runner (built by scripts/install_tools.sh): the issue's key, whose
3rd raw event never arrives and whose 5th arrives twice, publishes 1..n with each good event
once, in both expansions; the streaming one with its event-time and processing-time timers."""

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from sourcebeam.pipelines.options import pipeline_options
from sourcebeam.pipelines.runners import prism_binary
from sourcebeam.transforms.resequence import Resequence, SummarizeStats
from tests.test_resequence import issue_input, issue_published, published_once, seq_triples


@pytest.mark.integration
@pytest.mark.parametrize('expansion', ['batch', 'streaming'])
def test_third_missing_fifth_redelivered_publishes_one_to_n_on_prism(expansion):
  assert prism_binary(), 'no Prism binary: run scripts/install_tools.sh'
  # runner_args adds --prism_location (the worktree's .cache/bin/prism) and gives the
  # pipeline its own Prism server (see pipelines/runners.py).
  options = pipeline_options(['--runner=PrismRunner'])
  assert options.get_all_options()['prism_location'] == prism_binary()
  with beam.Pipeline(options=options) as p:
    result = p | beam.Create(issue_input()) | Resequence(expansion=expansion)
    assert_that(result.published | seq_triples('Triples'), equal_to(issue_published()),
                label='published')
    assert_that(result.published, published_once, label='once')
    assert_that(result.dead_letters | beam.Map(lambda d: (d['reason'], d['key'], d['missing'])),
                equal_to([('gap', 'a', [3, 3]), ('gap', 'b', [3, 3])]), label='gaps')
    assert_that(result.duplicates | beam.Map(lambda d: (d['key'], d['raw_sequence'])),
                equal_to([('a', 5), ('b', 5)]), label='duplicates')
    assert_that(result.stats | SummarizeStats() | beam.Map(
        lambda s: (s['received'], s['published'], s['duplicates_dropped'], s['gaps'], s['held'])),
        equal_to([(17, 15, 2, 2, 0)]), label='summary')
