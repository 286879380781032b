"""``glmserve serve`` (placeholder until the gRPC server lands)."""


def add_serve_parser(sub) -> None:
    sub.add_parser("serve", help="run the gRPC server")


def run_serve(args) -> int:
    raise NotImplementedError("serve is not implemented yet")
