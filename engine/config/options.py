"""The engine's options, defined once. Each is a field of ``EngineConfig`` or of one of its sections, and takes its
type and default from that dataclass; this table adds what a user reads (the help) and the allowed values. The
``glmserve`` CLI flags (``--max-num-seqs``) and the ``LLM(...)`` keywords (``max_num_seqs=``) both derive from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass

from glmserve.engine.config.engine_config import (ATTENTION_BACKENDS, DEVICES, DTYPES, LOAD_FORMATS, CacheConfig,
                                                  EngineConfig, SchedulerConfig)
from glmserve.engine.config.lora_config import LoraConfig
from glmserve.engine.config.model_config import preset_names

SECTIONS = {None: EngineConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "lora": LoraConfig}


@dataclass(frozen=True)
class EngineOption:
    name: str                               # the LLM keyword; the CLI flag is --name-with-dashes
    section: str | None                     # None: a field of EngineConfig; else the section holding the field
    help: str
    choices: tuple[str, ...] | None = None
    negative_flag: str | None = None        # a boolean that defaults to on is turned off with this flag
    flag: str | None = None                 # a repeatable NAME=PATH flag (a list of (name, path) pairs)

    @property
    def field(self) -> dataclasses.Field:
        return next(f for f in dataclasses.fields(SECTIONS[self.section]) if f.name == self.name)

    @property
    def default(self):
        f = self.field
        return f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING

    @property
    def value_type(self) -> type:
        """int for ``int | None``, and so on: what a CLI value is parsed as."""
        hint = typing.get_type_hints(SECTIONS[self.section])[self.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if args else hint


ENGINE_OPTIONS: tuple[EngineOption, ...] = (
    EngineOption("model", None, "a ChatGLM3 checkpoint directory or a preset with dummy weights "
                 f"({', '.join(preset_names())})"),
    EngineOption("load_format", None, "how the checkpoint's weights are stored", LOAD_FORMATS),
    EngineOption("tokenizer", None, "tokenizer.model path (default: the checkpoint's, or the embedded one)"),
    EngineOption("device", None, "where the model runs", DEVICES),
    EngineOption("dtype", None, "weights and activations (auto: bfloat16 on CUDA, float32 on the CPU)",
                 DTYPES),
    EngineOption("attention_backend", None, "auto: triton on CUDA; on the CPU the native kernels (cpu) where a C "
                 "compiler builds them, else torch (pure torch everywhere: the reference mode)", ATTENTION_BACKENDS),
    EngineOption("seed", None, "seed of the dummy weights (presets)"),
    EngineOption("tensor_parallel_size", None, "ranks the model is sharded over (torch.distributed)"),
    EngineOption("cuda_graphs", None, "replay decode steps as CUDA graphs (CUDA only, tensor parallel size 1)"),
    EngineOption("block_size", "cache", "tokens per KV-cache block (a power of two)"),
    EngineOption("num_kv_blocks", "cache", "KV-cache blocks (default: sized from the memory budget)"),
    EngineOption("kv_cache_memory", "cache", "bytes for the KV cache of all layers"),
    EngineOption("gpu_memory_utilization", "cache", "CUDA: fraction of the card for weights, activations and the "
                 "KV cache"),
    EngineOption("enable_prefix_caching", "cache", "reuse the KV blocks of shared prompt prefixes",
                 negative_flag="--no-prefix-caching"),
    EngineOption("max_num_seqs", "scheduler", "sequences in the running batch at most"),
    EngineOption("max_num_batched_tokens", "scheduler", "tokens computed per engine step at most"),
    EngineOption("enable_chunked_prefill", "scheduler", "split long prompts over several steps",
                 negative_flag="--no-chunked-prefill"),
    EngineOption("max_model_len", "scheduler", "longest prompt + output (default: the model's seq_length)"),
    EngineOption("max_loras", "lora", "LoRA adapters resident and running at once; more loaded ones take turns "
                 "(least recently used slot first)"),
    EngineOption("max_lora_rank", "lora", "the largest LoRA rank accepted (the size of each resident slot)"),
    EngineOption("lora_adapters", "lora", "load a PEFT LoRA adapter folder under NAME at start-up (repeatable)",
                 flag="--lora"),
    EngineOption("ptuning_prefixes", "lora", "load a ChatGLM3 P-tuning v2 checkpoint folder under NAME at start-up "
                 "(repeatable)", flag="--ptuning"),
)
OPTION_NAMES = frozenset(o.name for o in ENGINE_OPTIONS)


def build_engine_config(**values) -> EngineConfig:
    """An EngineConfig from options by name (``LLM(...)``'s keywords); options not given keep their defaults."""
    unknown = sorted(values.keys() - OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown engine option(s): {', '.join(unknown)} (known: {', '.join(sorted(OPTION_NAMES))})")
    sections: dict[str | None, dict] = {None: {}, "cache": {}, "scheduler": {}, "lora": {}}
    for option in ENGINE_OPTIONS:
        if option.name in values:
            sections[option.section][option.name] = values[option.name]
    return EngineConfig(**sections[None], cache=CacheConfig(**sections["cache"]),
                        scheduler=SchedulerConfig(**sections["scheduler"]), lora=LoraConfig(**sections["lora"]))


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and engine")
    for option in ENGINE_OPTIONS:
        if option.flag is not None:
            group.add_argument(option.flag, dest=option.name, action="append", default=[], metavar="NAME=PATH",
                               type=_name_and_path, help=option.help)
            continue
        flag = "--" + option.name.replace("_", "-")
        value_type = option.value_type
        if value_type is bool:
            if option.negative_flag:
                group.add_argument(option.negative_flag, dest=option.name, action="store_false",
                                   help=f"do not {option.help}")
            else:
                group.add_argument(flag, dest=option.name, action="store_true", help=option.help)
            continue
        required = option.default is dataclasses.MISSING
        group.add_argument(flag, dest=option.name, type=value_type, choices=option.choices, required=required,
                           default=None if required else option.default,
                           help=option.help + ("" if required or option.default is None else " (default: %(default)s)"))


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return build_engine_config(**{o.name: getattr(args, o.name) for o in ENGINE_OPTIONS})


def _name_and_path(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path
