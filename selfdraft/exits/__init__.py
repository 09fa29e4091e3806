"""Early-exit self-drafts: the target's own first E layers plus a small trained exit head.

An *exit head* turns the residual stream after layer E-1 into next-token logits:
- ``linear``: a norm (initialised from the target's final norm), a D x D adapter (initialised to the
  identity) and the target's frozen, shared LM head;
- ``layer``: one decoder layer (initialised from the target's last layer, with its own small KV cache),
  the norm and the shared LM head.
Either may be restricted to a *reduced draft vocabulary*: the N most frequent ids of the training text plus
the special tokens (FR-Spec, Zhao et al. 2025). The head then reads only those rows of the LM head, which
cuts its cost; verification is unchanged, so decoding stays lossless.

``ExitDraft`` (arm ``exit@E``) drafts with layers [0, E) writing the target's own KV cache, so verification
runs [0, E) only for the last draft token and [E, L) from the saved layer-E states (LayerSkip's KV and
exit-query reuse; Elhoushi et al. 2024, "LayerSkip"). The draft stops early when the head's top
probability falls below the arm's ``threshold``.

Modules: ``head`` (the head, its file), ``draft`` (the arm), ``data`` (training text and the target's
states), ``train`` (distillation and agreement), ``add`` (``ctxdraft add-exits`` end to end).
"""
