"""The front door: an aiohttp application with the OpenAI-compatible API (HTTP + SSE)."""
