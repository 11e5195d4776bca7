"""Logging: named events with fields, as JSON lines (or readable lines on a terminal)."""

from __future__ import annotations

import logging
import sys

import structlog
from aiohttp.http_exceptions import HttpProcessingError


def configure(level: str = "info") -> None:
    """Send structlog events (and stdlib logging from libraries) to stderr."""
    renderer: structlog.types.Processor
    if sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="%(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("aiohttp.server").addFilter(_client_protocol_errors)


def _client_protocol_errors(record: logging.LogRecord) -> bool:
    """Drop aiohttp's traceback for a malformed request: the client's fault, not ours, a
    log-flooding lever, and its message quotes the bad header (maybe a token)."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError):
        structlog.get_logger("firehosed.ingest").debug(
            "http.bad_request", status=error.code, error=type(error).__name__
        )
        return False
    return True
