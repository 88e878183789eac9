"""The QA console at ``/console``: calls live and past, one call's recordings, timeline
and media, the permission ledger. Served by wacall itself (no build step, no CDN); it logs
in with the API token and is off when there is none. See :mod:`.pages` and :mod:`.session`."""

from .pages import Console
from .session import ConsoleAuth

__all__ = ["Console", "ConsoleAuth"]
