"""``ds-serve <model_dir> --port P``: an OpenAI-compatible HTTP server for a local model."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ds-serve", description=__doc__)
    p.add_argument(
        "model_dir", help="local directory: config.json + safetensors + tokenizer, or a .gguf file"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--model-name", default=None, help="the id clients send as 'model' (default: the directory name)"
    )
    p.add_argument("--gguf-file", default=None, help="which .gguf file of model_dir to load")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--max-queue-size", type=int, default=256, help="requests in flight before answering 429")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-batched-tokens", type=int, default=512, help="token budget of one forward pass")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--no-prefix-caching", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ds_core.config import ConfigError

    from ..config import resolve_dtype
    from ..loading import load_model_and_tokenizer
    from ..serving import LLMEngine, ServingConfig
    from .server import run_server

    try:
        cfg = ServingConfig(
            block_size=args.block_size,
            num_blocks=args.num_blocks,
            kv_cache_gb=args.kv_cache_gb,
            max_num_batched_tokens=args.max_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            enable_prefix_caching=not args.no_prefix_caching,
            max_queue_size=args.max_queue_size,
        )
        model, tokenizer, name = load_model_and_tokenizer(
            args.model_dir, None, resolve_dtype(args.dtype), args.gguf_file
        )
        if tokenizer is None:
            raise ValueError(f"no tokenizer found in {args.model_dir}")
        engine = LLMEngine(model, tokenizer, cfg)
    except (FileNotFoundError, ValueError, ConfigError, OSError) as exc:
        print(f"ds-serve: error: {exc}", file=sys.stderr)
        return 2
    run_server(
        engine, args.model_name or name, args.host, args.port, args.max_queue_size, args.default_max_tokens
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
