"""Python client of the cachebind HTTP service (built on httpx).

from cachebind.client import CachebindClient, input_item

with CachebindClient("http://127.0.0.1:8000", api_key="cb_...") as client:
    hits = client.search([input_item("text", "a dog on a beach")], k=5)
    mix = [input_item("image", open("q.jpg", "rb").read()), input_item("audio", wav, 0.5)]
    for piece in client.generate("Describe the picture.", mix):
        print(piece, end="")
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import numpy as np

from cachebind.arrays import Floats
from cachebind.modalities import Modality


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
    vector = np.asarray(value, dtype=np.float32).ravel()
    return {"embedding": vector.tolist(), "weight": weight}


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
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
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

    def embed(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """F_M of each input: ``{"dim", "encoder", "items": [{"modality", "embedding"}]}``."""
        return self._post("/v1/embed", {"inputs": list(items)})

    def embed_files(self, modality: Modality | str, files: Sequence[bytes]) -> dict[str, Any]:
        """F_M of uploaded files of one modality (multipart)."""
        parts = [("file", (f"input{i}", data)) for i, data in enumerate(files)]
        response = self._http.post(
            "/v1/embed", data={"modality": str(Modality(modality))}, files=parts
        )
        return _json_object(self._check(response))

    def search(
        self,
        items: Sequence[dict[str, Any]],
        k: int = 10,
        *,
        filter: str | None = None,
        dedup: float | None = None,
        offset: int = 0,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """Nearest cached rows to the (mixed) query; ``next_cursor`` fetches the next page."""
        body: dict[str, Any] = {"inputs": list(items), "k": k, "offset": offset}
        for name, value in (("filter", filter), ("dedup", dedup), ("cursor", cursor)):
            if value is not None:
                body[name] = value
        return self._post("/v1/search", body)

    def enhance(
        self,
        items: Sequence[dict[str, Any]],
        k: int | None = None,
        t: float | None = None,
        alpha: float | None = None,
    ) -> dict[str, Any]:
        """F~_M with its neighbours and cosine(F_M, F~_M) (``cosine_to_query``)."""
        body = {"inputs": list(items), "k": k, "t": t, "alpha": alpha}
        return self._post("/v1/enhance", {n: v for n, v in body.items() if v is not None})

    def generate(
        self,
        prompt: str,
        items: Sequence[dict[str, Any]] = (),
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        k: int | None = None,
        t: float | None = None,
        alpha: float | None = None,
    ) -> Iterator[str]:
        """Stream the generated text piece by piece (server-sent events)."""
        body = _generate_body(prompt, items, True, locals())
        with self._http.stream("POST", "/v1/generate", json=body) as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            event: str | None = None
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[len("event:") :].strip()
                elif line.startswith("data:"):
                    payload = json.loads(line[len("data:") :])
                    if event is None:
                        yield payload["text"]
                    elif event == "error":
                        raise CachebindAPIError(200, payload.get("error", "error"), payload)
                    elif event == "done":
                        return
                elif not line:
                    event = None

    def generate_text(
        self, prompt: str, items: Sequence[dict[str, Any]] = (), **options: Any
    ) -> dict[str, Any]:
        """The whole generated text in one answer (``stream: false``)."""
        return self._post("/v1/generate", _generate_body(prompt, items, False, options))

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


def _generate_body(
    prompt: str, items: Sequence[dict[str, Any]], stream: bool, options: dict[str, Any]
) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "inputs": list(items), "stream": stream}
    for name in ("max_new_tokens", "temperature", "top_p", "k", "t", "alpha"):
        if options.get(name) is not None:
            body[name] = options[name]
    return body
