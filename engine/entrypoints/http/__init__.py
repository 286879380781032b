"""The OpenAI-compatible HTTP API: a second frontend of the server's one engine (FastAPI on uvicorn, on the same
event loop as gRPC)."""
