"""The gRPC frontend: server lifecycle, handlers, proto conversion, status codes, the Python clients."""
