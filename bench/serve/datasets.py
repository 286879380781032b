"""The requests of a serving benchmark: ``random`` token ids, ``sharegpt`` conversations, ``multiturn`` chats.

Every builder is a pure function of its inputs and a seed, so two runs (or two systems) see the same requests.
Lengths that depend on the server's tokenizer (ShareGPT) are measured by the caller and passed in.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from glmserve.bench.common.int_range import IntRange

# Ids 0-2 are <unk>, <s> and </s>: a random prompt avoids them so no prompt token looks like padding or eos.
FIRST_RANDOM_ID = 3
SHAREGPT_SAMPLE = Path(__file__).with_name("data") / "sharegpt_sample.json"

# Plain English words for the multiturn chats: their text tokenizes the same way every time, which is what a
# prefix cache needs to recognise a repeated history.
WORDS = ("the", "model", "server", "a", "batch", "of", "tokens", "is", "cached", "and", "every", "turn", "adds",
         "more", "history", "to", "prompt", "which", "grows", "while", "system", "stays", "same", "for", "all",
         "users", "so", "blocks", "are", "shared", "between", "requests", "kettle", "train", "river", "garden",
         "window", "paper", "story", "question", "answer", "please", "explain", "why", "how", "when", "short",
         "long", "quiet", "bright", "morning", "evening", "city", "road", "tea", "bread", "music", "number")


@dataclass(frozen=True)
class BenchPrompt:
    """One request before it is sent: token ids for Generate, or chat messages for Chat.

    A multiturn request names its ``session``: its ``messages`` are the new turn only, appended to what the
    session said and was answered before; its turns are sent in order.
    """

    output_len: int                                        # tokens to generate, exactly (eos and stops ignored)
    prompt_token_ids: tuple[int, ...] | None = None        # Generate
    messages: tuple[tuple[str, str], ...] | None = None    # Chat: (role, content) pairs
    prompt_len: int | None = None                          # known before sending (token ids, tokenized chats)
    session: int | None = None
    turn: int = 0


def random_prompts(num: int, input_len: IntRange, output_len: IntRange, vocab_size: int,
                   seed: int) -> list[BenchPrompt]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(num):
        ids = tuple(rng.randrange(FIRST_RANDOM_ID, vocab_size) for _ in range(input_len.draw(rng)))
        prompts.append(BenchPrompt(output_len.draw(rng), prompt_token_ids=ids, prompt_len=len(ids)))
    return prompts


# ---- ShareGPT ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Exchange:
    """A human turn and the gpt turn that answered it."""

    human: str
    gpt: str


def load_sharegpt(path: str | Path) -> list[Exchange]:
    """The first human -> gpt exchange of each conversation of a ShareGPT JSON file.

    The format is a list of ``{"conversations": [{"from": "human" | "gpt" | ..., "value": text}, ...]}``;
    conversations that do not start with a human turn answered by a gpt turn are skipped.
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read the ShareGPT file {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"the ShareGPT file {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, list):
        raise ValueError(f"the ShareGPT file {path} must hold a list of conversations")
    exchanges = []
    for item in raw:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if (isinstance(first, dict) and isinstance(second, dict) and first.get("from") == "human"
                and second.get("from") == "gpt" and first.get("value") and second.get("value")):
            exchanges.append(Exchange(str(first["value"]), str(second["value"])))
    if not exchanges:
        raise ValueError(f"the ShareGPT file {path} has no human -> gpt exchange")
    return exchanges


def sharegpt_prompts(exchanges: list[Exchange], prompt_lens: list[int], gpt_lens: list[int], num: int,
                     max_output_len: int, max_model_len: int, seed: int) -> list[BenchPrompt]:
    """``num`` chat requests drawn from the exchanges (shuffled, repeated when there are fewer).

    ``prompt_lens[i]`` is the chat prompt length of exchange i and ``gpt_lens[i]`` the token count of its gpt
    reply, both by the server's tokenizer; the reply length, capped at ``max_output_len``, becomes the output
    length. Exchanges that would not fit the context are left out.
    """
    usable = []
    for exchange, prompt_len, gpt_len in zip(exchanges, prompt_lens, gpt_lens):
        output_len = max(1, min(gpt_len, max_output_len))
        if prompt_len + output_len <= max_model_len:
            usable.append(BenchPrompt(output_len, messages=(("user", exchange.human),), prompt_len=prompt_len))
    if not usable:
        raise ValueError(f"no ShareGPT exchange fits max_model_len {max_model_len}")
    random.Random(seed).shuffle(usable)
    return [usable[i % len(usable)] for i in range(num)]


# ---- multiturn ---------------------------------------------------------------------------------------------------
def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def multiturn_prompts(num_users: int, num_turns: int, system_words: int, turn_words: IntRange,
                      output_len: IntRange, seed: int) -> list[BenchPrompt]:
    """Chats of ``num_users`` simulated users, ``num_turns`` turns each, all under one shared system prompt.

    Listed turn by turn (every user's first turn, then every user's second, ...), so arrivals spread each
    round over the users. A session's first turn carries the system prompt; each later one only the new user
    message, sent after the session's history.
    """
    rng = random.Random(seed)
    system = "You are a helpful assistant. " + words(rng, system_words)
    prompts = []
    for turn in range(num_turns):
        for user in range(num_users):
            message = ("user", f"user {user} turn {turn}: " + words(rng, turn_words.draw(rng)))
            messages = (("system", system), message) if turn == 0 else (message,)
            prompts.append(BenchPrompt(output_len.draw(rng), messages=messages, session=user, turn=turn))
    return prompts
