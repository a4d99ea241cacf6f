"""Training ImageBind-LLM from the cache (ImageBind-LLM section 3.2), on Ray Train.

ImageBind is frozen in both of the paper's stages, so its features F_M are read from the cache
table instead of re-encoding every image on every step. ``params`` names the trainable sets as
the release's ``get_trainable_params``; ``data`` turns cache rows into the release's prompts and
masked labels; ``step`` is the release's loss and optimiser; ``schedule`` its learning rate;
``export`` writes the released ``{"model": ...}`` layout; ``trainer`` runs it all on Ray Train.
"""
