"""Per-job run history (SPEC §9 HISTORY): SQLite through one writer thread.

``History`` (``store.py``) is the API; ``database.py`` holds the schema and statements;
``records.py`` what is handed out.
"""

from ztick_tw.history.database import INTERRUPTED, HistoryError
from ztick_tw.history.records import FINISHED, OUTCOMES, RunHandle, RunRecord
from ztick_tw.history.store import DROPPED_OUTPUT, History

__all__ = [
    "DROPPED_OUTPUT",
    "FINISHED",
    "INTERRUPTED",
    "OUTCOMES",
    "History",
    "HistoryError",
    "RunHandle",
    "RunRecord",
]
