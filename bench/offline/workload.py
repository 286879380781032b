"""A synthetic offline workload: prompts of random token ids and fixed output lengths, both uniform in a range."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from glmserve.bench.common.int_range import IntRange

# Prompt ids start above <unk>/pad (0), <s> (1) and </s> (2): no prompt token then looks like padding or eos.
FIRST_PROMPT_ID = 3


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int             # tokens to generate, exactly (eos is ignored)


def make_workload(num_requests: int, input_len: IntRange, output_len: IntRange, vocab_size: int,
                  seed: int) -> list[BenchRequest]:
    """The same requests for every system under test, in arrival order."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(r: IntRange) -> int:
        return int(torch.randint(r.low, r.high + 1, (), generator=gen))

    requests = []
    for _ in range(num_requests):
        prompt_len, out_len = uniform(input_len), uniform(output_len)
        prompt = torch.randint(FIRST_PROMPT_ID, vocab_size, (prompt_len,), generator=gen).tolist()
        requests.append(BenchRequest(prompt, out_len))
    return requests
