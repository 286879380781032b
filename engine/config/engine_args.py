"""Engine flags shared by every command that builds an engine (generate, serve), and the config they make."""
from __future__ import annotations

import argparse

from glmserve.engine.config.engine_config import CacheConfig, EngineConfig, SchedulerConfig, preset_names


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and engine")
    g.add_argument("--model", required=True,
                   help=f"a ChatGLM3 checkpoint directory or a preset ({', '.join(preset_names())})")
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "bin", "dummy"])
    g.add_argument("--tokenizer", default=None, help="tokenizer.model path (default: the checkpoint's)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "cpu", "triton"],
                   help="auto: triton on CUDA; on the CPU the native decode kernel (cpu) where a C compiler "
                        "builds it, else torch")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tensor-parallel-size", type=int, default=1)
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay decode steps as CUDA graphs (CUDA only, tensor parallel size 1)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache of all layers")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    g.add_argument("--max-num-seqs", type=int, default=128)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, load_format=args.load_format, tokenizer=args.tokenizer, device=args.device,
        dtype=args.dtype, attention_backend=args.attention_backend, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size, cuda_graphs=args.cuda_graphs,
        cache=CacheConfig(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                          kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
                          enable_prefix_caching=args.enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  enable_chunked_prefill=args.enable_chunked_prefill,
                                  max_model_len=args.max_model_len))
