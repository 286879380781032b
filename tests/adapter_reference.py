"""Independent references for fine-tunes, and a trace of what the engine computed.

- LoRA: PEFT's ``PeftModel`` on HF ``GlmForCausalLM``, the adapter files read straight from disk and mapped to HF's
  module names (GLM3_FACTS.md): a query_key_value adapter becomes q_proj/k_proj/v_proj adapters with the same A and
  B's rows split as Q | K | V; dense -> o_proj, dense_h_to_4h -> gate_up_proj, dense_4h_to_h -> down_proj.
- P-tuning v2: ChatGLM3's own prefix encoder (Embedding, or Embedding -> Linear -> Tanh -> Linear) rebuilt here in
  torch.nn and loaded from the checkpoint's state dict, its output laid out as ``get_prompt`` does, put into a
  ``DynamicCache`` of HF ``GlmForCausalLM`` before the prompt (positions from 0, attention mask of ones).
- ``EngineTrace`` records, for every step of a real ``Engine``, the final hidden state of each scheduled token and
  which request it belongs to, so each request's logits can be compared position by position.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from glmserve.engine.config.model_config import ModelConfig

HF_MODULE = {"query_key_value": ("q_proj", "k_proj", "v_proj"), "dense": ("o_proj",),
             "dense_h_to_4h": ("gate_up_proj",), "dense_4h_to_h": ("down_proj",)}
HF_OWNER = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
            "gate_up_proj": "mlp", "down_proj": "mlp"}


def _read_adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(folder / "adapter_model.safetensors"))
    return torch.load(folder / "adapter_model.bin", weights_only=True)


def build_peft_model(hf_model, config: ModelConfig, adapters: dict[str, Path]):
    """PeftModel on ``hf_model`` with every adapter folder loaded under its name (fp32, dropout off)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    q, kv = config.q_size, config.kv_size
    rows = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
    peft_model = None
    for name, folder in adapters.items():
        settings = json.loads((folder / "adapter_config.json").read_text())
        targets = [hf for module in settings["target_modules"] for hf in HF_MODULE[module]]
        lora_config = LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"], target_modules=targets,
                                 use_rslora=settings.get("use_rslora", False), lora_dropout=0.0, bias="none")
        if peft_model is None:
            peft_model = get_peft_model(hf_model, lora_config, adapter_name=name)
        else:
            peft_model.add_adapter(name, lora_config)
        state = {}
        for tensor_name, value in _read_adapter_tensors(folder).items():
            # base_model.model.transformer.encoder.layers.{i}.<owner>.<module>.lora_{A,B}.weight
            parts = tensor_name.split(".")
            layer, module, half = int(parts[5]), parts[7], parts[8]
            for hf in HF_MODULE[module]:
                piece = value[rows[hf]] if half == "lora_B" and hf in rows else value
                state[f"base_model.model.model.layers.{layer}.{HF_OWNER[hf]}.{hf}.{half}.weight"] = piece
        result = set_peft_model_state_dict(peft_model, state, adapter_name=name)
        assert not result.unexpected_keys, result.unexpected_keys
    return peft_model.eval()


def peft_logits_fn(peft_model, adapter: str | None):
    """tokens -> logits [L, V] of the whole sequence with ``adapter`` active (None: adapters disabled)."""
    @torch.no_grad()
    def forward(tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens])
        if adapter is None:
            with peft_model.disable_adapter():
                return peft_model(ids).logits[0].float()
        peft_model.set_adapter(adapter)
        return peft_model(ids).logits[0].float()
    return forward


# ---- P-tuning v2 ----------------------------------------------------------------------------------------------
class PrefixEncoder(torch.nn.Module):
    """ChatGLM3's prefix encoder (modeling_chatglm.py), for loading the checkpoint's state dict."""

    def __init__(self, config: ModelConfig, pre_seq_len: int, prefix_projection: bool):
        super().__init__()
        kv_size = config.num_layers * config.kv_channels * config.multi_query_group_num * 2
        self.prefix_projection = prefix_projection
        self.embedding = torch.nn.Embedding(pre_seq_len, kv_size)
        if prefix_projection:
            self.trans = torch.nn.Sequential(torch.nn.Linear(kv_size, config.hidden_size), torch.nn.Tanh(),
                                             torch.nn.Linear(config.hidden_size, kv_size))

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(prefix)
        return self.trans(embedded) if self.prefix_projection else embedded


def reference_prefix_kv(folder: Path, config: ModelConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V) [1, groups, P, head_dim], as ChatGLM3's get_prompt lays the encoder's output out."""
    settings = json.loads((folder / "config.json").read_text())
    pre_seq_len = settings["pre_seq_len"]
    encoder = PrefixEncoder(config, pre_seq_len, settings.get("prefix_projection", False))
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    prefix_state = {k[len("transformer.prefix_encoder."):]: v for k, v in state.items()
                    if k.startswith("transformer.prefix_encoder.")}
    encoder.load_state_dict(prefix_state)
    with torch.no_grad():
        past = encoder(torch.arange(pre_seq_len)[None])                                  # [1, P, kv_size]
    past = past.view(1, pre_seq_len, config.num_layers * 2, config.multi_query_group_num, config.kv_channels)
    past = past.permute(2, 1, 0, 3, 4).split(2)          # per layer [2, P, batch, groups, head_dim]
    # ChatGLM's cache layout [P, batch, groups, D] -> HF's [batch, groups, P, D]
    return [(kv[0].permute(1, 2, 0, 3), kv[1].permute(1, 2, 0, 3)) for kv in past]


def prefix_logits_fn(hf_model, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """tokens -> logits [L, V] of HF GlmForCausalLM with a fresh cache pre-filled with the prefix K/V."""
    from transformers import DynamicCache
    cache_arg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    pre_seq_len = prefix_kv[0][0].shape[2]

    @torch.no_grad()
    def forward(tokens: list[int]) -> torch.Tensor:
        cache = DynamicCache()
        for layer, (k, v) in enumerate(prefix_kv):
            cache.update(k.clone(), v.clone(), layer)
        n = len(tokens)
        out = hf_model(torch.tensor([tokens]), position_ids=torch.arange(n)[None],
                       attention_mask=torch.ones(1, pre_seq_len + n, dtype=torch.long), use_cache=True,
                       **{cache_arg: cache})
        return out.logits[0].float()
    return forward


# ---- comparisons ----------------------------------------------------------------------------------------------
def reference_greedy(logits_fn, prompt: list[int], steps: int, vocab: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens of a reference (ids >= ``vocab`` never chosen, as the engine's sampler) and each step's logits."""
    tokens, step_logits = list(prompt), []
    for _ in range(steps):
        logits = logits_fn(tokens)[-1]
        step_logits.append(logits)
        tokens.append(int(logits[:vocab].argmax()))
    return tokens[len(prompt):], step_logits


def assert_greedy_matches(ours: list[int], reference: list[int], step_logits: list[torch.Tensor], what: str,
                          tie: float = 1e-4) -> None:
    """Identical greedy tokens; a difference is accepted only at a genuine tie of the reference (its two tokens'
    logits within ``tie``), after which the continuations legitimately part."""
    assert len(ours) == len(reference), f"{what}: {len(ours)} tokens, reference {len(reference)}"
    for k, (mine, theirs) in enumerate(zip(ours, reference)):
        if mine != theirs:
            gap = abs(float(step_logits[k][mine] - step_logits[k][theirs]))
            assert gap <= tie, f"{what}: token {k} is {mine}, reference {theirs} (logit gap {gap:.2e}, not a tie)"
            return


class EngineTrace:
    """Hooks on a real engine's runner: per request, the final hidden state of each token it computed."""

    def __init__(self, engine):
        self.engine = engine
        self.rows: dict[str, list[tuple[int, torch.Tensor]]] = {}      # request id -> (position, hidden)
        self._step: list[tuple[str, int, int]] = []
        runner = engine.runner
        batch_order = runner.batch_order

        def record_order(batch, lora_slots):
            # The order in which the runner lays the step's sequences out as rows.
            order = batch_order(batch, lora_slots)
            self._step = [(batch.requests[i].request_id, batch.requests[i].num_computed_tokens,
                           batch.num_new_tokens[i]) for i in order]
            self._expected_ids = [t for i in order for t in batch.requests[i].token_ids[
                batch.requests[i].num_computed_tokens:batch.requests[i].num_computed_tokens + batch.num_new_tokens[i]]]
            return order

        runner.batch_order = record_order
        runner.model.register_forward_hook(self._record)

    def _record(self, _module, args, hidden):
        input_ids = args[0].tolist()
        assert input_ids == self._expected_ids, "the rows are not in the order the runner reported"
        row = 0
        for request_id, start, n in self._step:
            for k in range(n):
                self.rows.setdefault(request_id, []).append((start + k, hidden[row + k].detach().clone()))
            row += n

    def logits(self, request_id: str) -> torch.Tensor:
        """[L, V] float32: the logits after each position the request computed, in position order."""
        rows = sorted(self.rows[request_id], key=lambda r: r[0])
        positions = [p for p, _ in rows]
        assert positions == list(range(positions[0], positions[0] + len(positions))), positions
        with torch.no_grad():
            return self.engine.runner.model.compute_logits(torch.stack([h for _, h in rows]))
