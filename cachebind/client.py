"""Python client of the cachebind HTTP service.

It imports only httpx and the standard library (pandas / pyarrow only when a result is
converted), so it installs without the server stack: ``pip install clients/python``.

from cachebind.client import CachebindClient, input_item

with CachebindClient("http://127.0.0.1:8000", api_key="cb_...") as client:
    hits = client.search([input_item("text", "a dog on a beach")], k=5)
    hits.to_pandas()  # one row per result
    mix = [input_item("image", open("q.jpg", "rb").read()), input_item("audio", wav, 0.5)]
    stream = client.generate("Describe the picture.", mix, seed=7)
    for piece in stream:
        print(piece, end="")
    stream.neighbours, stream.finish_reason, stream.usage
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from cachebind.modalities import Modality

if TYPE_CHECKING:  # the light client (clients/python) installs without numpy
    from cachebind.arrays import Floats


def _json_object(response: httpx.Response) -> dict[str, Any]:
    """The JSON object a route answers with (every route answers with one)."""
    body = response.json()
    if not isinstance(body, dict):
        detail = f"the answer is a JSON {type(body).__name__}, not an object"
        raise CachebindAPIError(response.status_code, "unexpected_answer", detail)
    return body


class CachebindAPIError(RuntimeError):
    """A non-2xx answer: ``status``, the service's ``error`` tag and its ``detail``."""

    def __init__(self, status: int, error: str, detail: Any) -> None:
        super().__init__(f"HTTP {status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


class Results(dict[str, Any]):
    """A decoded JSON answer whose list of rows (search results, embeddings, neighbours)
    converts to a DataFrame or an Arrow table, one row per entry."""

    def __init__(self, body: dict[str, Any], rows: str) -> None:
        super().__init__(body)
        self.rows_key = rows

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self.get(self.rows_key) or [])

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` of the rows (pandas is needed only here)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.rows, columns=_columns(self.rows))

    def to_arrow(self) -> Any:
        """A ``pyarrow.Table`` of the rows (pyarrow is needed only here)."""
        import pyarrow as pa

        return pa.Table.from_pylist(self.rows) if self.rows else pa.table({})


def _columns(rows: list[dict[str, Any]]) -> list[str] | None:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return list(names) or None


class GenerationStream(Iterator[str]):
    """The text pieces of a streamed generation; once it has begun, ``neighbours`` holds the
    cached rows that drove it, and once it has ended, ``text``, ``finish_reason`` and
    ``usage``."""

    def __init__(self, events: Iterator[tuple[str | None, dict[str, Any]]]) -> None:
        self._events = events
        self.neighbours: list[dict[str, Any]] | None = None
        self.text: str | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> str:
        for event, payload in self._events:
            if event is None:
                return str(payload["text"])
            if event == "neighbours":
                self.neighbours = payload["neighbours"]
            elif event == "error":
                raise CachebindAPIError(200, payload.get("error", "error"), payload)
            elif event == "done":
                self.text = payload.get("text")
                self.finish_reason = payload.get("finish_reason")
                self.usage = payload.get("usage")
        raise StopIteration

    def close(self) -> None:
        """Stop reading (the server frees the generation's slot)."""
        close = getattr(self._events, "close", None)
        if close is not None:
            close()


def input_item(
    modality: Modality | str | None,
    value: str | bytes | Sequence[float] | Floats,
    weight: float = 1.0,
) -> dict[str, Any]:
    """One query input: text (str), a medium (bytes, sent as base64) or a raw embedding."""
    if isinstance(value, str):
        return {"modality": str(Modality(modality or "text")), "text": value, "weight": weight}
    if isinstance(value, bytes | bytearray | memoryview):
        m = Modality(modality) if modality is not None else None
        if m is None:
            raise ValueError("a medium needs its modality")
        if m is Modality.TEXT:
            return {"modality": "text", "text": bytes(value).decode("utf-8"), "weight": weight}
        data = base64.b64encode(bytes(value)).decode("ascii")
        return {"modality": str(m), "data": data, "weight": weight}
    # A numpy array or any iterable of numbers (numpy is not needed for either).
    flat = value.ravel().tolist() if hasattr(value, "ravel") else list(value)
    return {"embedding": [float(v) for v in flat], "weight": weight}


class CachebindClient:
    """Calls ``/v1`` of a cachebind service; every method returns the decoded JSON."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        # Row ids are exact Python ints: ask for them as JSON numbers (the default, strings,
        # is for JavaScript, whose numbers round past 2^53).
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            params={"ids": "number"},
            timeout=timeout,
            transport=transport,
        )
        self._server: Any = None

    @classmethod
    def in_process(cls, settings: Any, timeout: float = 600.0) -> CachebindClient:
        """A client of a private server started in this process from ``settings``.

        The server binds 127.0.0.1 on a free port and accepts only a one-time key made here;
        ``close()`` stops it. This is what the CLI uses when no ``--url`` is given.
        """
        from cachebind.serve import start_server
        from cachebind.serve.auth import KeyStore, generate_key, hash_key

        key = generate_key()
        digest = bytes.fromhex(hash_key(key).split(":", 1)[1])
        settings = settings.model_copy(deep=True)
        settings.serve.index_poll_s = 0  # a one-shot command needs no live reloads
        server = start_server(settings, keys=KeyStore(user=[digest], admin=[digest]), port=0)
        client = cls(server.url, api_key=key, timeout=timeout)
        client._server = server
        return client

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        self._http.close()
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> CachebindClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                body = response.json()
                error, detail = body.get("error", "error"), body.get("detail")
            except (json.JSONDecodeError, AttributeError):
                error, detail = "error", response.text[:500]
            raise CachebindAPIError(response.status_code, error, detail)
        return response

    def _post(self, path: str, body: dict[str, Any], **params: Any) -> dict[str, Any]:
        return _json_object(self._check(self._http.post(path, json=body, params=params or None)))

    def _get(self, path: str) -> dict[str, Any]:
        return _json_object(self._check(self._http.get(path)))

    # ------------------------------------------------------------------ API

    def embed(self, items: Sequence[dict[str, Any]]) -> Results:
        """F_M of each input: ``{"dim", "encoder", "items": [{"modality", "embedding"}]}``
        (rows: ``items``)."""
        return Results(self._post("/v1/embed", {"inputs": list(items)}), "items")

    def embed_files(self, modality: Modality | str, files: Sequence[bytes]) -> Results:
        """F_M of uploaded files of one modality (multipart; rows: ``items``)."""
        parts = [("file", (f"input{i}", data)) for i, data in enumerate(files)]
        response = self._http.post(
            "/v1/embed", data={"modality": str(Modality(modality))}, files=parts
        )
        return Results(_json_object(self._check(response)), "items")

    def search(
        self,
        items: Sequence[dict[str, Any]],
        k: int = 10,
        *,
        filter: str | None = None,
        dedup: float | None = None,
        offset: int = 0,
        cursor: str | None = None,
    ) -> Results:
        """Nearest cached rows to the (mixed) query; ``next_cursor`` fetches the next page
        (rows: ``results``)."""
        body: dict[str, Any] = {"inputs": list(items), "k": k, "offset": offset}
        for name, value in (("filter", filter), ("dedup", dedup), ("cursor", cursor)):
            if value is not None:
                body[name] = value
        return Results(self._post("/v1/search", body), "results")

    def enhance(
        self,
        items: Sequence[dict[str, Any]],
        k: int | None = None,
        t: float | None = None,
        alpha: float | None = None,
    ) -> Results:
        """F~_M with its neighbours and cosine(F_M, F~_M) (``cosine_to_query``; rows:
        ``neighbours``)."""
        body = {"inputs": list(items), "k": k, "t": t, "alpha": alpha}
        answer = self._post("/v1/enhance", {n: v for n, v in body.items() if v is not None})
        return Results(answer, "neighbours")

    def generate(
        self,
        prompt: str,
        items: Sequence[dict[str, Any]] = (),
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        k: int | None = None,
        t: float | None = None,
        alpha: float | None = None,
    ) -> GenerationStream:
        """Stream the generated text piece by piece (server-sent events); the stream also
        holds the neighbours, the finish reason and the token counts. The same ``seed`` gives
        the same text."""
        body = _generate_body(prompt, items, True, locals())
        return GenerationStream(self._events("/v1/generate", body))

    def _events(
        self, path: str, body: dict[str, Any]
    ) -> Iterator[tuple[str | None, dict[str, Any]]]:
        with self._http.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            event: str | None = None
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[len("event:") :].strip()
                elif line.startswith("data:"):
                    yield event, json.loads(line[len("data:") :])
                    if event in ("done", "error"):
                        return
                elif not line:
                    event = None

    def generate_text(
        self,
        prompt: str,
        items: Sequence[dict[str, Any]] = (),
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        k: int | None = None,
        t: float | None = None,
        alpha: float | None = None,
    ) -> Results:
        """The whole generated text in one answer (``stream: false``): ``text``,
        ``neighbours`` (the rows), ``finish_reason`` and ``usage``."""
        body = _generate_body(prompt, items, False, locals())
        return Results(self._post("/v1/generate", body), "neighbours")

    def image(self, row_id: int) -> bytes:
        """The thumbnail JPEG of a cached row."""
        return self._check(self._http.get(f"/v1/images/{int(row_id)}")).content

    def index_info(self) -> dict[str, Any]:
        return self._get("/v1/index")

    def reload(self, force: bool = False) -> dict[str, Any]:
        """Admin: load the published index version now."""
        return self._post("/v1/admin/reload", {}, force=str(force).lower())

    def health(self) -> dict[str, Any]:
        return self._get("/healthz")

    def ready(self) -> dict[str, Any]:
        response = self._http.get("/readyz")
        if response.status_code not in (200, 503):
            self._check(response)
        return _json_object(response)


GENERATE_OPTIONS = ("max_new_tokens", "temperature", "top_p", "seed", "k", "t", "alpha")


def _generate_body(
    prompt: str, items: Sequence[dict[str, Any]], stream: bool, options: dict[str, Any]
) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "inputs": list(items), "stream": stream}
    for name in GENERATE_OPTIONS:
        if options.get(name) is not None:
            body[name] = options[name]
    return body
