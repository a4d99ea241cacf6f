"""Text preprocessing: token ids identical to ImageBind's own SimpleTokenizer (loaded from the
reference file of imagebind-unofficial 0.1.1 with the reference's own BPE file)."""

from __future__ import annotations

import gzip
from importlib import resources

import preprocess_oracle
import pytest
import torch

from cachebind.errors import InputError
from cachebind.preprocess import preprocess
from cachebind.preprocess.text import (
    BPE_ASSET,
    CONTEXT_LENGTH,
    EOT_TOKEN,
    SOT_TOKEN,
    VOCAB_SIZE,
    default_tokenizer,
)

STRINGS = [
    "a dog",
    "A photo of a dog.",
    "A PHOTO OF A DOG",
    "two cats sleeping on a red couch",
    "",
    "   leading and trailing   ",
    "tabs\tand\nnew\r\nlines",
    "don't you'll we've they're I'm she's it'd",
    "numbers 1234567890 and 3.14159 and 1,000,000",
    "punctuation!!! ??? ... --- (brackets) [square] {curly} <angle>",
    "html &amp; entities &lt;b&gt; &amp;amp; &#39;quoted&#39; &quot;x&quot;",
    "café naïve façade résumé coöperate",
    "Straße groß ÄÖÜ äöü",
    "日本語のテキストと漢字",
    "中文文本测试",
    "한국어 텍스트",
    "русский текст и кириллица",
    "العربية نص",
    "हिन्दी पाठ",
    "emoji 🐶🐱🚀 and flags 🇫🇷 and zwj 👩‍👩‍👧",
    "mojibake: â€œquotedâ€\x9d and Ã©",  # ftfy repairs this
    "ﬁ ligature and full-width ＡＢＣ",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "mixed: http://example.com/path?q=1&b=2 #hashtag @user",
    "x" * 300,
    " ".join(["word"] * 120),
    " ".join(f"token{i}" for i in range(200)),
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a\u00a0non-breaking\u2003em-space\u200bzero-width",
    "C++ and C# and F# and .NET",
    "control \x00\x01\x07 chars",
]


def test_vocabulary_has_clip_size_and_special_ids():
    tok = default_tokenizer()
    assert len(tok.encoder) == VOCAB_SIZE == 49408
    assert tok.sot == SOT_TOKEN == 49406 and tok.eot == EOT_TOKEN == 49407


def test_packaged_vocabulary_is_the_reference_file():
    ours = resources.files("cachebind.preprocess").joinpath("assets").joinpath(BPE_ASSET)
    with open(preprocess_oracle.reference_bpe_path(), "rb") as fh:
        theirs = fh.read()
    assert gzip.decompress(ours.read_bytes()) == gzip.decompress(theirs)


@pytest.mark.parametrize("text", STRINGS, ids=range(len(STRINGS)))
def test_ids_equal_the_reference_tokenizer(text):
    ref = preprocess_oracle.reference_tokenizer()
    ours = default_tokenizer()(text)
    assert ours.dtype == torch.int64 and ours.shape == (CONTEXT_LENGTH,)
    assert torch.equal(ours, ref(text))


def test_long_text_keeps_sot_and_75_tokens_then_eot():
    text = " ".join(f"token{i}" for i in range(200))
    tok = default_tokenizer()
    ids = tok(text)
    assert ids[0] == SOT_TOKEN and ids[-1] == EOT_TOKEN
    assert ids[1:76].tolist() == tok.encode(text)[:75]
    assert (ids != 0).all()


def test_short_text_is_zero_padded_after_eot():
    ids = preprocess("text", "a dog")
    assert ids.tolist()[:4] == [SOT_TOKEN, 320, 1929, EOT_TOKEN]
    assert (ids[4:] == 0).all()


def test_utf8_bytes_are_accepted_like_str():
    assert torch.equal(preprocess("text", "café 🐶".encode()), preprocess("text", "café 🐶"))


@pytest.mark.parametrize(
    ("data", "reason"),
    [("", "empty"), (" \n\t ", "empty"), (b"\xff\xfe\xfa", "undecodable"), (123, "wrong_type")],
)
def test_bad_text_is_refused(data, reason):
    with pytest.raises(InputError) as err:
        preprocess("text", data, source="caption-7")
    assert err.value.reason == reason and "caption-7" in str(err.value)
