"""`run.py bench causal`: its arguments (the measurement itself runs in tests/test_causal.py's
stack and in the README's benchmark table)."""

import pytest

from tests.cli import run_cli

pytestmark = pytest.mark.cli


@pytest.mark.parametrize('args', [['--rate', '0'], ['--reads', '-1'], ['--warmup', '-2']])
def test_bad_arguments_are_exit_2_with_one_line(args):
  proc = run_cli('bench', 'causal', *args)
  assert proc.returncode == 2, proc.stderr
  assert 'Traceback' not in proc.stderr and '--rate' in proc.stderr


def test_help_says_what_is_measured():
  proc = run_cli('bench', 'causal', '--help')
  assert proc.returncode == 0 and '--rate' in proc.stdout and '--reads' in proc.stdout


def test_the_breakdown_puts_each_stage_between_its_marks():
  """Synthetic marks (seconds) -> per-stage milliseconds: each row is its end mark minus its start
  mark; the view API's notice counts from the commit or from the read's arrival, if later;
  rounds without a mark leave that stage out, not zero."""
  from sourcebeam.benchmarks.causal import STAGES, breakdown, round_marks
  base = 1000.0
  marks = {'post_sent': 0, 'w.received': .001, 'w.appending': .002, 'w.acked': .005,
           'receipt_at': .007, 'v.received': .008, 'p.bundle': .020, 'p.seen': .030,
           'p.handled': .050, 'p.sink': .051, 'p.begun': .060, 'p.committing': .062,
           'v.noticed': .064, 'v.answered': .065, 'answer': .066}
  one = {k: base + v for k, v in marks.items()}
  late_read = dict(one, **{'v.received': base + .063})  # the read arrived after the commit
  no_pipeline = {k: v for k, v in one.items() if not k.startswith('p.')}
  table = {row['stage']: row for row in breakdown([one, late_read, no_pipeline])}
  assert [name for name, _, _ in STAGES] == list(table)

  def ms(stage):
    return table[stage]['p50_ms'], table[stage]['n']
  assert ms('Kafka produce -> ack') == (3.0, 3)
  assert ms('ack -> pipeline sees it') == (25.0, 2)  # absent where the pipeline recorded nothing
  assert ms('seen -> handler') == (20.0, 2)
  assert table['commit -> view API notices']['p50_ms'] == 1.0  # from the read's arrival
  assert table['commit -> view API notices']['p99_ms'] == 2.0  # from the commit
  assert ms('TOTAL: POST -> visible') == (66.0, 3)
  # A round of add_then_view(timing=True) with the pipeline's stage times -> those marks.
  r = {'post_sent': 1.0, 'receipt_at': 2.0, 'get_sent': 3.0, 'answer': 4.0,
       'writer': {'acked': 1.5}, 'views': {'noticed': 3.5}}
  assert round_marks(r, {'seen': 1.7}) == {'post_sent': 1.0, 'receipt_at': 2.0, 'get_sent': 3.0,
                                           'answer': 4.0, 'w.acked': 1.5, 'v.noticed': 3.5,
                                           'p.seen': 1.7}


def test_the_rates_while_loaded_are_slopes_through_every_look():
  from sourcebeam.benchmarks.causal import _slope
  t = [0.0, 0.5, 1.0, 1.5, 2.0]
  assert _slope(t, [0, 100, 200, 300, 400]) == 200.0
  # One look that caught a bundle in flight moves a two-look rate by 100 ev/s, the slope by 40.
  assert _slope(t, [0, 100, 200, 300, 350]) == 180.0
  assert _slope([1.0], [5]) == 0.0
