"""Channel registry: one line per channel type, naming its module, config Struct and class.

Adding a channel type means adding its module to this folder and one line to
`REGISTRY`. Modules are imported only when a config uses their type, so a daemon that
writes to a directory never loads the AWS, SSH or FTP libraries (idle memory).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from firehosed.channels.base import Channel


class Entry(NamedTuple):
    """Where a channel type lives: its module, and the names of its config Struct (tagged
    with the type) and of its Channel class in that module."""

    module: str
    config: str
    channel: str

    def config_type(self) -> type[Any]:
        """The config Struct class (imports the module)."""
        struct: type[Any] = getattr(importlib.import_module(self.module), self.config)
        return struct

    def channel_type(self) -> type[Channel]:
        """The Channel class (imports the module)."""
        cls: type[Channel] = getattr(importlib.import_module(self.module), self.channel)
        return cls

    def open(self, name: str, config: Any) -> Channel:
        """A channel of this type for a decoded config Struct."""
        make: Callable[[str, Any], Channel] = self.channel_type()
        return make(name, config)


REGISTRY: dict[str, Entry] = {
    "directory": Entry("firehosed.channels.directory", "DirectoryConfig", "DirectoryChannel"),
    "ftp": Entry("firehosed.channels.ftp", "FtpConfig", "FtpChannel"),
    "ftpes": Entry("firehosed.channels.ftp", "FtpesConfig", "FtpChannel"),
    "sftp": Entry("firehosed.channels.sftp", "SftpConfig", "SftpChannel"),
    "webhook": Entry("firehosed.channels.webhook", "WebhookConfig", "WebhookChannel"),
    "pubsub": Entry("firehosed.channels.pubsub", "PubSubConfig", "PubSubChannel"),
    "s3": Entry("firehosed.channels.s3", "S3Config", "S3Channel"),
    "sqs": Entry("firehosed.channels.sqs", "SqsConfig", "SqsChannel"),
}


def config_type(channel_type: str) -> type[Any]:
    """The config Struct class for a channel type; KeyError when there is none."""
    return REGISTRY[channel_type].config_type()


def open_channel(name: str, config: Any) -> Channel:
    """Build the channel for a decoded channel config Struct."""
    return REGISTRY[type(config).__struct_config__.tag].open(name, config)


__all__ = ["REGISTRY", "Entry", "config_type", "open_channel"]
