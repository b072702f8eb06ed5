"""The demo application (retail, taxi, riders): ``--app sourcebeam.demo:app``, the default.

Written only with Sourcebeam's public API (``sourcebeam``), in a folder of its own,
like any team's application: its event schemas in ``schemas/``, its consumers in
``app.py`` (:data:`app`), their business logic in ``retail.py``, ``taxi.py`` and
``taxi_logic.py``, ``riders.py``.
"""

from .app import app

__all__ = ['app']
