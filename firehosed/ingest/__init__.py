"""HTTP ingestion: the aiohttp app, authentication and request-body parsing."""
