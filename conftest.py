"""Suite-wide rules: a skipped test is a failed test.

Tests that need a service start it from the project's scripts; if it cannot
start, the test must fail, not skip, so a green run always means every test ran.
"""

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if report.skipped and not hasattr(report, 'wasxfail'):
    report.outcome = 'failed'
    report.longrepr = f'skipped tests are not allowed in Sourcebeam\'s suite: {report.longrepr}'
