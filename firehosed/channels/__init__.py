"""Channel registry: one line per channel type, mapping its config Struct to its class.

Adding a channel type means adding its module here and one line to `REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from firehosed.channels.base import Batch, Channel
from firehosed.channels.directory import DirectoryChannel, DirectoryConfig

ChannelFactory = Callable[[str, Any], Channel]

REGISTRY: dict[type[Any], ChannelFactory] = {
    DirectoryConfig: DirectoryChannel,
}

CHANNEL_CONFIGS: tuple[type[Any], ...] = tuple(REGISTRY)


def open_channel(name: str, config: Any) -> Channel:
    """Build the channel for a decoded channel config Struct."""
    return REGISTRY[type(config)](name, config)


__all__ = ["CHANNEL_CONFIGS", "REGISTRY", "Batch", "Channel", "open_channel"]
