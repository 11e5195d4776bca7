"""Durable per-firehose queues: framed segments, group commit, cut batches."""
