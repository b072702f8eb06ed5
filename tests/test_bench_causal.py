"""`run.py bench causal`: its arguments (the measurement itself runs in tests/test_causal.py's
stack and in the README's benchmark table)."""

import os
import subprocess
import sys

import pytest

from sourcebeam.pipelines.runners import ROOT


@pytest.mark.parametrize('args', [['--rate', '0'], ['--reads', '-1'], ['--warmup', '-2']])
def test_bad_arguments_are_exit_2_with_one_line(args):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), 'bench', 'causal', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert 'Traceback' not in proc.stderr and '--rate' in proc.stderr


def test_help_says_what_is_measured():
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), 'bench', 'causal', '--help'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and '--rate' in proc.stdout and '--reads' in proc.stdout
