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
