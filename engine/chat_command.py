"""``glmserve chat`` (placeholder until the gRPC client lands)."""


def add_chat_parser(sub) -> None:
    sub.add_parser("chat", help="chat with a running server")


def run_chat(args) -> int:
    raise NotImplementedError("chat is not implemented yet")
