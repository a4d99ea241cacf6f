"""The OpenAI-compatible surface: ``/v1/models``, ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/embeddings`` over the same encoder, cache blend and generator as
the native routes. ``schemas`` holds the request models, ``media`` turns content parts into
inputs, ``render`` turns a conversation into the release's prompt, ``errors`` gives every
failure OpenAI's error shape and ``routes`` the handlers."""
