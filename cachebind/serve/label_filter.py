"""A search filter on zero-shot labels: the ids a label side table gives the asked labels."""

from __future__ import annotations

import asyncio
import re

import pyarrow as pa
import pyarrow.compute as pc

from cachebind.analysis.labelling import ids_with_labels
from cachebind.config import StoreConfig
from cachebind.serve.errors import ApiError, unprocessable
from cachebind.serve.schemas import LabelFilter


async def label_where(
    store: StoreConfig, body: LabelFilter, where: pc.Expression | None
) -> pc.Expression:
    """``where`` AND "id is labelled one of ``body.labels``" (a 422 for a name that is not a
    label table of the served table, a 404 for one that does not exist)."""
    # Only names `cachebind classify` makes: a client's text never names another table.
    if not re.fullmatch(rf"{re.escape(store.table)}_labels_[0-9a-f]{{12}}", body.table):
        raise unprocessable(
            "bad_label_filter",
            f"label_filter.table must be a label table of {store.table!r} "
            f"({store.table}_labels_<12 hex digits>, as `cachebind classify` prints)",
        )
    try:
        ids = await asyncio.to_thread(ids_with_labels, store, body.table, body.labels)
    except FileNotFoundError as exc:
        raise ApiError(404, "not_found", f"no label table {body.table!r}") from exc
    labelled = pc.field("id").isin(pa.array(ids, pa.int64()))
    return labelled if where is None else where & labelled
