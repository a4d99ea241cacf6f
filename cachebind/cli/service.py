"""`cachebind serve` and `cachebind keys`: the HTTP service and its API keys."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cachebind.cli.options import CommonOptions, Subcommands, command
from cachebind.config import Settings


def add_serve(sub: Subcommands, common: CommonOptions) -> None:
    p = command(
        sub,
        "serve",
        cmd_serve,
        "run the HTTP service (embed, search, enhance, generate)",
        "Serve the versioned HTTP API (/v1/embed, /v1/search, /v1/enhance, /v1/generate, "
        "/v1/index, /healthz, /readyz, /metrics, OpenAPI at /docs) and the search page at /. "
        "API keys are read hashed from --api-keys-file; new index versions are picked up live.",
        parents=[common.table, common.index_dir, common.encoder],
    )
    p.add_argument("--host", dest="serve__host")
    p.add_argument("--port", dest="serve__port", type=int)
    p.add_argument("--api-keys-file", dest="serve__api_keys_file")
    p.add_argument("--admin-keys-file", dest="serve__admin_keys_file")
    p.add_argument(
        "--no-auth",
        dest="serve__auth",
        action="store_const",
        const=False,
        help="serve without API keys (local experiments only)",
    )
    p.add_argument(
        "--llama-dir",
        dest="llm__llama_dir",
        metavar="DIR",
        help="LLaMA weights and tokenizer (Meta or Hugging Face layout): enables /v1/generate "
        "and the OpenAI chat and completion routes",
    )
    p.add_argument(
        "--adapter-checkpoint",
        dest="llm__adapter_checkpoint",
        metavar="FILE",
        help="the ImageBind-LLM adapter checkpoint as released (e.g. 7B.pth)",
    )
    p.add_argument(
        "--llava-dir",
        dest="llm__llava_dir",
        metavar="DIR",
        action=TokensMode,
        help="serve a llava-hf LLaVA-1.5 directory in tokens mode instead (sets llm.mode=llava)",
    )
    p.add_argument(
        "--mixed-projector",
        dest="llm__mixed_projector",
        metavar="FILE",
        action=TokensMode,
        help="serve SPHINX's mixed embedding in tokens mode: a mixed_projector.pth from `train "
        "llava-pretrain` with tokens_train.mix, its encoders from embed.extra_encoders (and the "
        "served ImageBind), the LLM of --llava-dir or --llama-dir (sets llm.mode=llava)",
    )


class TokensMode(argparse.Action):
    """``--llava-dir DIR`` is ``llm.llava_dir = DIR`` and ``llm.mode = "llava"``: naming the
    directory is choosing the mode; so is naming a mixed projector."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.llm__mode = "llava"


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from cachebind.serve import serve_forever

    serve_forever(settings)
    return 0


def add_keys(sub: Subcommands, common: CommonOptions) -> None:
    p = command(
        sub,
        "keys",
        cmd_keys,
        "create an API key for the service",
        "Generate a random API key, print it once, and append its sha256 to FILE (use the "
        "file as --api-keys-file, or as --admin-keys-file for admin keys).",
    )
    p.add_argument("action", choices=["create"])
    p.add_argument("file", help="keys file to append the hash to")


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    from cachebind.serve.auth import create_key

    key = create_key(Path(args.file))
    print(key)
    print(
        f"(its sha256 was appended to {args.file}; the key itself is not stored anywhere)",
        file=sys.stderr,
    )
    return 0
