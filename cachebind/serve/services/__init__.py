"""The service layer of the server: one module per kind of work a route asks for.

Each service owns its batcher, a frozen request type (named fields, never a positional tuple)
and the batch function that answers a list of those requests at once. Routes validate
and shape responses around them; ``ServeState`` creates and closes them and nothing else.

- ``encode``: raw input -> F_M, decoded in the sandbox, micro-batched per modality.
- ``search``: nearest rows of a snapshot's index, micro-batched across requests.
- ``enhance``: F_M -> F~_M through a snapshot's cache model, micro-batched across requests.
- ``batchers``: the micro-batcher each service builds (window, size, batch-size metric).
- ``generate``: a generation queued on the runtime's scheduler (its continuous batcher).
"""

from cachebind.serve.services.encode import EncodeService
from cachebind.serve.services.enhance import EnhanceQuery, EnhanceService
from cachebind.serve.services.generate import GenerateService, GenerationRequest
from cachebind.serve.services.search import SearchQuery, SearchService

__all__ = [
    "EncodeService",
    "EnhanceQuery",
    "EnhanceService",
    "GenerateService",
    "GenerationRequest",
    "SearchQuery",
    "SearchService",
]
