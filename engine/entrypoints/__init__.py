"""Thin frontends of one engine: the offline ``LLM``, the gRPC server and client, the CLI."""
