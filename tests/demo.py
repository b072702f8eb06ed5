"""The demo application, for tests that use its event types (retail, taxi, riders)."""

import os

from sourcebeam.demo import app as DEMO_APP

REG = DEMO_APP.registry
DEMO_SCHEMAS = REG.schema_dir
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
