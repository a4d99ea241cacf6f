"""The encoder a table records, compared with the encoder a command is configured with.

A table's vectors mean something only next to queries of the encoder that embedded them: a
search with another preset or checkpoint answers, with scores that say nothing. The embedding
job records its encoder in the table's metadata (``encoder``: model, preset, out_dim, weights,
sha256, preprocess_version); the server (at start and at each reload) and every in-process
command compare it with theirs here, so do the builders that append to a table.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from cachebind.config import EncoderConfig, WeightsConfig
from cachebind.store.errors import EncoderMismatchError

log = logging.getLogger("cachebind.store")

COMPARED = ("model", "preset", "out_dim", "weights", "preprocess_version")
"""What must agree; ``weights`` is ``sha256:<checkpoint sha256>`` or ``random-init:seed=N``.
(The checkpoint's path may differ between machines: its sha256 may not.)"""

OVERRIDE = "--allow-encoder-mismatch (encoder.allow_mismatch = true)"


def recorded_encoder(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """The encoder identity a table's cachebind metadata records; None when it records none
    (a table written by hand or by a test)."""
    encoder = (metadata or {}).get("encoder")
    if not isinstance(encoder, dict):
        return None
    record = dict(encoder)
    # Tables record the preprocessing version at the top level too (older ones only there).
    record.setdefault("preprocess_version", (metadata or {}).get("preprocess_version"))
    return record


def configured_encoder(encoder: EncoderConfig, weights: WeightsConfig) -> dict[str, Any]:
    """The identity ``encoder`` would have, without allocating its weights (meta device)."""
    from cachebind.encode import Encoder

    probe = Encoder.from_config(encoder.model_copy(update={"device": "meta"}), weights)
    return dict(probe.identity)


def differences(configured: dict[str, Any], recorded: dict[str, Any]) -> dict[str, tuple]:
    """``{field: (table's, configured)}`` of the compared fields the table records."""
    return {
        k: (recorded[k], configured.get(k))
        for k in COMPARED
        if k in recorded and recorded[k] != configured.get(k)
    }


def _summary(identity: dict[str, Any]) -> str:
    return (
        f"{identity.get('model')} preset {identity.get('preset')!r} "
        f"({identity.get('out_dim')}-d, weights {identity.get('weights')}, "
        f"preprocessing version {identity.get('preprocess_version')})"
    )


def _fixes(recorded: dict[str, Any], differing: dict[str, tuple]) -> list[str]:
    fixes = []
    if {"model", "preset", "out_dim"} & differing.keys():
        preset = recorded.get("preset")
        fixes.append(f"--preset {preset} (encoder.preset = {json.dumps(preset)})")
    weights = str(recorded.get("weights") or "")
    if "weights" in differing and weights.startswith("sha256:"):
        fixes.append(
            f"--checkpoint FILE (encoder.checkpoint) naming the file of {weights} "
            f"(the table's was {recorded.get('checkpoint')})"
        )
    elif "weights" in differing and weights.startswith("random-init:seed="):
        seed = weights.split("=", 1)[1]
        fixes.append(f"no checkpoint and encoder.seed = {seed} (a randomly initialised encoder)")
    if "preprocess_version" in differing:
        fixes.append("re-embedding the table with this version (its preprocessing changed)")
    return fixes


def check_encoder(
    configured: dict[str, Any],
    metadata: dict[str, Any] | None,
    where: str,
    *,
    allow: bool,
) -> None:
    """Raise :class:`EncoderMismatchError` naming both encoders and the fix unless the table
    at ``where`` records ``configured`` (or records no encoder); with ``allow``, log it."""
    recorded = recorded_encoder(metadata)
    if recorded is None:
        log.info("table %s records no encoder; its vectors are served as they are", where)
        return
    differing = differences(configured, recorded)
    if not differing:
        return
    lines = "\n".join(
        f"  {k}: table {json.dumps(have)}, configured {json.dumps(want)}"
        for k, (have, want) in differing.items()
    )
    message = (
        f"table {where} was embedded by {_summary(recorded)}, but the configured encoder is "
        f"{_summary(configured)}:\n{lines}\n"
        f"Configure the table's encoder ({'; '.join(_fixes(recorded, differing))}), or pass "
        f"{OVERRIDE} to use this one anyway."
    )
    if allow:
        log.warning("%s\nUsing it anyway: encoder.allow_mismatch is set.", message)
        return
    raise EncoderMismatchError(message)
