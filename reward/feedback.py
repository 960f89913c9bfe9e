"""Training data straight from a running feedback service: one export version, recorded in the run directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from alignloop.config import ConfigError
from alignloop.data import DataError
from reward.config import FeedbackSource

EXPORT_META = "feedback_export.json"


def _token(src: FeedbackSource) -> str:
    if src.token is not None:
        return src.token.get_secret_value()
    tok = os.environ.get(src.token_env)
    if not tok:
        raise ConfigError(f"data.feedback: no token (set data.feedback.token or the environment variable {src.token_env})")
    return tok


def fetch_export(src: FeedbackSource, jsonl: Path) -> dict:
    """Create (or reuse ``export_id``) an export version, write its rows to ``jsonl``; return what was used.

    The returned record (export id = version, watermark, row count, campaign) goes to
    ``feedback_export.json`` next to the rows, so a run says exactly which feedback it learned from.
    """
    from feedback_service.client import FeedbackClient, FeedbackError

    import httpx

    try:
        with FeedbackClient(src.url, _token(src), retries=2) as fc:
            if src.export_id is not None:
                ex = fc.get_export(src.export_id, jsonl_path=jsonl)
            else:
                campaign_id = _campaign_id(fc, src.campaign)
                ex = fc.export(campaign_id, strategy=src.strategy, aggregation=src.aggregation,
                               min_rankings=src.min_rankings, since_watermark=src.since_watermark,
                               since_last=src.since_last, jsonl_path=jsonl)
    except FeedbackError as e:
        raise ConfigError(f"data.feedback: the service at {src.url} answered {e}") from None
    except httpx.HTTPError as e:
        raise ConfigError(f"data.feedback: cannot reach the feedback service at {src.url} ({type(e).__name__}: {e})") from None
    if not ex.rows:
        raise DataError(f"data.feedback: export version {ex.version} of campaign {src.campaign!r} has no preference pairs "
                        f"(watermark {ex.info.get('watermark')}, since {ex.info.get('since_watermark')})")
    record = {"url": src.url, "campaign": src.campaign, "export_id": ex.version, "version": ex.version,
              "watermark": ex.watermark, "since_watermark": ex.info.get("since_watermark"), "rows": len(ex.rows),
              "created_at": ex.info.get("created_at"), "params": ex.info.get("params")}
    (jsonl.parent / EXPORT_META).write_text(json.dumps(record, indent=1) + "\n")
    return record


def _campaign_id(fc, campaign: str) -> int:
    if campaign.isdigit():
        return int(campaign)
    found = [c for c in fc.list_campaigns() if c["name"] == campaign]
    if not found:
        raise ConfigError(f"data.feedback.campaign: no campaign named {campaign!r} on the service")
    return int(found[0]["id"])
