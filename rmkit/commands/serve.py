"""`rmkit serve CKPT [--domain NAME=CKPT_OR_ADAPTER ...]`: load reward models once, score over HTTP."""

from __future__ import annotations

from typing import List, Optional

import typer

HELP = (
    "Serve reward models over HTTP (FastAPI + uvicorn; install with `pip install 'rmkit[serve]'`).\n\n"
    "CKPT is the 'default' domain: an rmkit checkpoint, a LoRA adapter checkpoint, or any Hugging Face "
    "reward folder. Each --domain NAME=PATH adds one more; LoRA adapters of one base share one copy of it.\n\n"
    "Endpoints: POST /v1/score {prompt, responses, domain?} -> {rewards}; POST /get_reward {query} -> "
    "{rewards} (OpenRLHF's remote reward model); GET /health; GET /v1/models (lineage).\n\n"
    "Examples:\n\n"
    "rmkit serve runs/grft/final --domain business=runs/crft-business/final --port 8000\n\n"
    "curl -s localhost:8000/v1/score -d '{\"prompt\": \"Q\", \"responses\": [\"A\", \"B\"]}'"
)


def serve_command(
    checkpoint: str = typer.Argument(..., metavar="CKPT", help="The default domain's checkpoint."),
    domain: Optional[List[str]] = typer.Option(None, "--domain", metavar="NAME=CKPT_OR_ADAPTER", help="Another domain (repeatable)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    token: Optional[str] = typer.Option(None, "--token", envvar="RMKIT_SERVE_TOKEN", help="Require 'Authorization: Bearer TOKEN' (all but /health)."),
    max_pending: int = typer.Option(256, "--max-pending", help="Requests admitted and unanswered at once; past it: 503 + Retry-After."),
    window_ms: float = typer.Option(5.0, "--batch-window-ms", help="How long a batch's first request waits for others."),
    max_batch_tokens: int = typer.Option(8192, "--max-batch-tokens", help="Token positions per forward (a larger lone request runs alone)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Records per forward inside a batch (default: the whole batch)."),
    max_texts: int = typer.Option(256, "--max-texts", help="Responses per /v1/score, queries per /get_reward."),
    max_text_chars: int = typer.Option(100_000, "--max-text-chars", help="Characters per prompt or response."),
    max_body_bytes: int = typer.Option(4 << 20, "--max-body-bytes", help="Largest request body."),
    drain_s: float = typer.Option(30.0, "--drain-seconds", help="How long SIGTERM / Ctrl-C waits for in-flight requests."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads per forward (default: torch's); 1 stops a shared CPU from stalling small forwards."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a folder's own model code."),
) -> None:
    from rmkit.errors import RmkitError

    for flag, value in (("--port", port), ("--max-pending", max_pending), ("--max-batch-tokens", max_batch_tokens),
                        ("--max-texts", max_texts), ("--max-text-chars", max_text_chars),
                        ("--max-body-bytes", max_body_bytes), ("--batch-size", batch_size or 1),
                        ("--threads", threads or 1)):
        if value < 1:
            raise RmkitError(f"{flag} must be at least 1, got {value}", where=flag)
    if port > 65535:
        raise RmkitError(f"--port must be at most 65535, got {port}", where="--port")
    if window_ms < 0 or drain_s < 0:
        raise RmkitError("--batch-window-ms and --drain-seconds must not be negative")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        raise RmkitError(f"`rmkit serve` needs {e.name}, which is not installed",
                         hint="pip install 'rmkit[serve]' (fastapi + uvicorn)") from None
    from rmkit.serve.app import ServeConfig, run
    from rmkit.serve.registry import build_registry, parse_domain_arg

    pairs = [parse_domain_arg(d) for d in domain or []]
    if threads is not None:  # on a CPU shared with other work, 2+ OpenMP threads wait on each other
        import torch

        torch.set_num_threads(threads)
    registry = build_registry(checkpoint, pairs, trust_remote_code=trust_remote_code)
    cfg = ServeConfig(max_pending=max_pending, window_ms=window_ms, max_batch_tokens=max_batch_tokens,
                      batch_size=batch_size, max_texts=max_texts, max_text_chars=max_text_chars,
                      max_body_bytes=max_body_bytes, token=token, drain_s=drain_s)
    run(registry, cfg, host, port)


def register(app: typer.Typer) -> None:
    app.command("serve", help=HELP)(serve_command)
