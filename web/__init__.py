"""The front door: an aiohttp application with the OpenAI-compatible API (HTTP + SSE), a websocket
API, a chat page, Prometheus metrics, and an async client (web/client.py)."""
