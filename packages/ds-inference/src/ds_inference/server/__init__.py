"""OpenAI-compatible HTTP serving (``ds-serve``)."""

from .server import ServerHandle, run_server, start_server

__all__ = ["ServerHandle", "run_server", "start_server"]
