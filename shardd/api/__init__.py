"""The HTTP/JSON API v1 (aiohttp): routes, validation, auth, errors, OpenAPI."""
