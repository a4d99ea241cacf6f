"""Specification of LangChain's OpenAI clients (``ChatOpenAI``, ``OpenAIEmbeddings``) against
a live server on 127.0.0.1: unchanged, pointed at ``/v1``, they get the same answers as the
native routes."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
from fixtures_media import image_bytes
from langchain_core.messages import AIMessageChunk, HumanMessage
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from openai_calls import (
    ENCODER,
    LLM,
    SAMPLING,
    data_url,
    native_embeddings,
    native_generate,
)

pytestmark = pytest.mark.served(rows=80, llm=True, max_inputs=8)

IMAGE = image_bytes(seed=4)
IMAGE_URL = data_url(IMAGE, "image/png")
TIMEOUT_S = 120  # every client call is bounded


def chat_model(served, api_key: str | None = None, **options) -> ChatOpenAI:
    return ChatOpenAI(
        model=LLM,
        base_url=f"{served.url}/v1",
        api_key=api_key or served.svc.user_key,
        max_retries=0,
        timeout=TIMEOUT_S,
        **SAMPLING,
        **options,
    )


def embeddings_model(served, api_key: str | None = None) -> OpenAIEmbeddings:
    return OpenAIEmbeddings(
        model=ENCODER,
        base_url=f"{served.url}/v1",
        api_key=api_key or served.svc.user_key,
        max_retries=0,
        timeout=TIMEOUT_S,
        # By default it first counts tokens with tiktoken, whose encoding file is downloaded on
        # first use (no network here, and not this encoder's tokenizer): send the raw texts.
        check_embedding_ctx_length=False,
    )


@pytest.fixture(scope="module")
def http(served):
    headers = {"Authorization": f"Bearer {served.svc.user_key}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=TIMEOUT_S) as c:
        yield c


def image_question(text: str) -> list[HumanMessage]:
    parts = [{"type": "image_url", "image_url": {"url": IMAGE_URL}}, {"type": "text", "text": text}]
    return [HumanMessage(content=parts)]


def streamed(model: ChatOpenAI, messages) -> AIMessageChunk:
    chunks = list(model.stream(messages))
    assert len(chunks) > 1  # pieces, not one answer at the end
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    return total


# ---------------------------------------------------------------- ChatOpenAI


def test_a_seeded_chat_invoke_gives_the_same_text_twice_and_the_text_of_native_generate(
    served, http
):
    model = chat_model(served)
    first = model.invoke("Describe the picture.")
    second = model.invoke("Describe the picture.")
    assert first.content == second.content == native_generate(http, "Describe the picture.")["text"]
    assert first.response_metadata["finish_reason"] in ("stop", "length")
    assert first.response_metadata["model_name"] == LLM
    assert 0 < first.usage_metadata["output_tokens"] <= SAMPLING["max_tokens"]


def test_a_streamed_chat_adds_up_to_the_invoked_text_with_its_usage(served):
    model = chat_model(served, stream_usage=True)
    whole = model.invoke("Tell me about dogs.")
    total = streamed(model, "Tell me about dogs.")
    assert total.content == whole.content
    assert total.response_metadata["finish_reason"] == whole.response_metadata["finish_reason"]
    for count in ("input_tokens", "output_tokens", "total_tokens"):
        assert total.usage_metadata[count] == whole.usage_metadata[count] > 0


def test_an_image_data_url_part_is_answered_as_native_generate_invoked_or_streamed(served, http):
    model = chat_model(served)
    question = image_question("What is in the image?")
    first = model.invoke(question)
    second = model.invoke(question)
    native = native_generate(
        http, "What is in the image?", [{"modality": "image", "data": IMAGE_URL}]
    )
    assert first.content == second.content == native["text"]
    assert streamed(model, question).content == first.content


# ---------------------------------------------------------------- OpenAIEmbeddings


def test_embed_query_and_embed_documents_equal_the_native_embed_route(served, http):
    model = embeddings_model(served)
    texts = ["a dog on the grass", "a red car", "rain at night"]
    documents = model.embed_documents(texts)
    query = model.embed_query("a dog on the grass")
    native = native_embeddings(http, texts)
    # Unit vectors encoded in separate micro-batches: equal to float32 rounding.
    assert np.allclose(documents, native, rtol=0, atol=1e-6)
    assert np.allclose(query, native[0], rtol=0, atol=1e-6)
    assert np.allclose(np.linalg.norm(documents, axis=1), 1, atol=1e-5)


# ---------------------------------------------------------------- errors


def test_a_bad_key_raises_the_sdks_authentication_error_from_both_clients(served):
    with pytest.raises(openai.AuthenticationError) as chat_err:
        chat_model(served, api_key="not-a-key").invoke("Hello")
    with pytest.raises(openai.AuthenticationError) as embed_err:
        embeddings_model(served, api_key="not-a-key").embed_query("a dog")
    for err in (chat_err, embed_err):
        assert err.value.status_code == 401
        assert err.value.body["type"] == "authentication_error"
