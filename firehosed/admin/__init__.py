"""The operators' listener (`[admin]`): status page, metrics, status, tail, replay, reload."""
