"""firehosed: receive signals over HTTP and deliver them, without loss, to files and streams."""

__version__ = "0.1.0"
