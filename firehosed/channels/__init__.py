"""Channel registry: one line per channel type, naming its module, config Struct and class.

Adding a channel type means adding its module to this folder and one line to
`REGISTRY`. Modules are imported only when a config uses their type, so a daemon that
writes to a directory never loads the AWS, SSH or FTP libraries (idle memory).
"""

from __future__ import annotations

import importlib
from typing import Any

from firehosed.channels.base import Batch, Channel

# type: (module, config Struct, channel class)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "directory": ("firehosed.channels.directory", "DirectoryConfig", "DirectoryChannel"),
    "ftp": ("firehosed.channels.ftp", "FtpConfig", "FtpChannel"),
    "ftpes": ("firehosed.channels.ftp", "FtpesConfig", "FtpChannel"),
    "sftp": ("firehosed.channels.sftp", "SftpConfig", "SftpChannel"),
    "webhook": ("firehosed.channels.webhook", "WebhookConfig", "WebhookChannel"),
    "pubsub": ("firehosed.channels.pubsub", "PubSubConfig", "PubSubChannel"),
    "s3": ("firehosed.channels.s3", "S3Config", "S3Channel"),
    "sqs": ("firehosed.channels.sqs", "SqsConfig", "SqsChannel"),
}


def config_type(channel_type: str) -> Any:
    """The config Struct class for a channel type; KeyError when there is none."""
    module, config_class, _ = REGISTRY[channel_type]
    return getattr(importlib.import_module(module), config_class)


def open_channel(name: str, config: Any) -> Channel:
    """Build the channel for a decoded channel config Struct."""
    module, _, channel_class = REGISTRY[type(config).__struct_config__.tag]
    channel: Channel = getattr(importlib.import_module(module), channel_class)(name, config)
    return channel


__all__ = ["REGISTRY", "Batch", "Channel", "config_type", "open_channel"]
