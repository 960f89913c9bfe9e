"""``alignloop reward-serve --model RUN/final [--port 8100]``: score (prompt, answer) batches over HTTP.

The remote reward model PPO calls when the reward model lives on another machine.
Thin routes over :class:`reward.scorer.RewardScorer`; bad input is a 422 with the
field that is wrong (never a 500): empty or oversized batches, texts over the
length limit, wrong types, unknown keys.

    POST /score  {"items": [{"prompt": "2+2?", "answer": "4"}], "normalize": false}
              -> {"scores": [1.23], "normalized": false}
    GET  /health -> {"status": "ok", "model": "..."}
    GET  /info   -> reward statistics saved with the model (mean, std, max_length, eval accuracy)
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_CHARS = 100_000


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_CHARS)]


class ScoreItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Annotated[str, Field(max_length=MAX_CHARS)] | Annotated[list[Message], Field(min_length=1, max_length=256)]
    answer: Annotated[str, Field(max_length=MAX_CHARS)]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: Annotated[list[ScoreItem], Field(min_length=1, description="(prompt, answer) pairs; at most the server's --max-batch")]
    normalize: bool | None = Field(None, description="(r - mean) / std with the saved statistics; default: the server's setting")


class ScoreResponse(BaseModel):
    scores: list[float | None]  # None only if the model produced a non-finite value
    normalized: bool


def create_app(scorer, *, max_batch: int = 256):
    """FastAPI app around a scorer object with ``score(prompts, answers)`` and ``stats``."""
    from fastapi import FastAPI, HTTPException
    from fastapi.concurrency import run_in_threadpool

    app = FastAPI(title="alignloop reward model", version="1")
    std = scorer.stats.get("std")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": str(scorer.path)}

    @app.get("/info")
    def info() -> dict:
        return {"model": str(scorer.path), "normalize_default": scorer.normalize, "stats": scorer.stats, "max_batch": max_batch}

    @app.post("/score", response_model=ScoreResponse)
    async def score(req: ScoreRequest) -> ScoreResponse:
        if len(req.items) > max_batch:
            raise HTTPException(422, f"items: {len(req.items)} items, this server takes at most {max_batch} per request")
        normalize = scorer.normalize if req.normalize is None else req.normalize
        if normalize and not std:
            raise HTTPException(422, "normalize=true, but this model has no saved reward statistics")
        prompts = [it.prompt if isinstance(it.prompt, str) else [m.model_dump() for m in it.prompt] for it in req.items]
        for i, p in enumerate(prompts):
            if isinstance(p, list) and p[-1]["role"] == "assistant":
                raise HTTPException(422, f"items[{i}].prompt: a chat history must end with a user or system turn")
        out = await run_in_threadpool(scorer.score_conversations,
                                      [_conv(p, it.answer) for p, it in zip(prompts, req.items)], normalize)
        return ScoreResponse(scores=[r if math.isfinite(r) else None for r in out], normalized=normalize)

    return app


def _conv(prompt, answer: str) -> list[dict]:
    from reward.scorer import conversation

    return conversation(prompt, answer)


def main(argv: list[str]) -> int:
    from alignloop.stage import quiet_env

    quiet_env()
    ap = argparse.ArgumentParser(prog="alignloop reward-serve", description="score (prompt, answer) batches over HTTP")
    ap.add_argument("--model", required=True, help="reward model directory (a run's final/, or the run directory)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--normalize", action="store_true", help="return (r - mean) / std by default")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    ap.add_argument("--max-batch", type=int, default=256, help="most items one request may carry")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    from alignloop.config import ConfigError
    from reward.scorer import RewardScorer

    try:
        scorer = RewardScorer(args.model, batch_size=args.batch_size, normalize=args.normalize, threads=args.threads)
    except ConfigError as e:
        print(f"alignloop reward-serve: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    print(f"[alignloop] reward-serve: {scorer.path} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(create_app(scorer, max_batch=args.max_batch), host=args.host, port=args.port, log_level="warning")
    return 0
