"""Suite-wide rules: a skipped test is a failed test.

Tests that need a service start it from the project's scripts; if it cannot
start, the test must fail, not skip, so a green run always means every test ran.
"""

import pytest

# The tiers (fast, cli, integration) and their rules: service fixtures mark a test
# integration, and a test outside integration cannot start a process (tests/tiers.py).
pytest_plugins = ['tests.tiers', 'pytester']  # pytester: tests/test_tiers.py runs sessions in process


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if report.skipped and not hasattr(report, 'wasxfail'):
    report.outcome = 'failed'
    report.longrepr = f'skipped tests are not allowed in Sourcebeam\'s suite: {report.longrepr}'


# Property tests explore new random cases on developers' machines; in CI they run a fixed
# derandomized set, so a submission's result does not depend on the draw.
import os  # noqa: E402

from hypothesis import settings  # noqa: E402

settings.register_profile('ci', derandomize=True, print_blob=True)
if os.environ.get('CI'):
  settings.load_profile('ci')
