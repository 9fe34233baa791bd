"""Text subjects (Hugging Face models): an instance is its token window, as display strings.

The collected windows are the subject's first ``dataset.collect.n_instances`` windows; a row's
position indexes its window's token ids (special tokens included, so positions line up). The
strings are plain text, never HTML-escaped: the dashboard inserts them as text.

Causal LMs also get each feature's logit effects: its raw-space decoder direction times the
unembedding matrix (the final layer norm is not applied: its per-token scale and centring
depend on the whole residual stream, not on one direction), top tokens promoted and suppressed.
"""

from __future__ import annotations

import torch

from ...errors import DataError
from ..examples import sig

KIND = "text"
N_LOGIT_TOKENS = 10
LOGIT_CHUNK = 256  # features through the unembedding at once


def _is_wordpiece(tokenizer) -> bool:
    """WordPiece marks continuations with '##' (BERT): other pieces start a new word."""
    try:
        return tokenizer.convert_tokens_to_string(["a", "##b"]) == "ab"
    except Exception:  # noqa: BLE001 - a tokenizer without the method: not WordPiece
        return False


def display_tokens(tokenizer, ids: list[int]) -> list[str]:
    """One readable string per token id: WordPiece '##x' -> 'x' and other pieces get a leading
    space; byte-level BPE 'Ġ' and SentencePiece '▁' become spaces ('Ċ' a newline)."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_tokens)
    if _is_wordpiece(tokenizer):
        return [p if p in special else p[2:] if p.startswith("##") else (" " + p if i else p) for i, p in enumerate(pieces)]
    out = []
    for p in pieces:
        if p in special:
            out.append(p)
            continue
        try:
            out.append(tokenizer.convert_tokens_to_string([p]))
        except Exception:  # noqa: BLE001 - fall back on the markers alone
            out.append(p.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n"))
    return out


def render(subject, dataset, instance_ids: list[int]) -> dict[int, dict]:
    if not instance_ids:
        return {}
    if getattr(subject, "text", None) is None:
        subject.configure(dataset)
    # The collected windows are the first collect.n_instances; asked for together with the causal
    # check's windows after them, as the subject's task asks, so one cached build serves both.
    try:
        windows = subject.windows(dataset.collect.n_instances + subject.spec.evaluate.n_windows)[0]
    except DataError:  # a corpus with no room for the causal check's windows: the collected ones alone
        windows = subject.windows(dataset.collect.n_instances)[0]
    return {i: {"tokens": display_tokens(subject.tokenizer, windows[i].tolist())} for i in instance_ids}


@torch.no_grad()
def logit_effects(subject, decoder: torch.Tensor) -> list[dict] | None:
    """Per feature, the tokens its decoder direction (raw space, [F, d]) promotes and suppresses
    most through the unembedding, with the logit change per unit activation; None unless the
    subject is a causal LM whose hidden size is the decoder's width."""
    spec = getattr(subject, "spec", None)
    if getattr(spec, "auto_class", None) != "AutoModelForCausalLM":
        return None
    head = subject.model.get_output_embeddings()
    if head is None or head.weight.shape[1] != decoder.shape[1]:
        return None
    unembed = head.weight.detach().float().cpu()  # [V, d] (on the CPU, beside the decoder: the same numbers on any device)
    k = min(N_LOGIT_TOKENS, unembed.shape[0])
    out = []
    for chunk in decoder.float().split(LOGIT_CHUNK):
        logits = chunk @ unembed.t()
        up, down = logits.topk(k, dim=1), (-logits).topk(k, dim=1)
        for ui, uv, di, dv in zip(up.indices.tolist(), up.values.tolist(), down.indices.tolist(), down.values.tolist()):
            up_tokens, down_tokens = display_tokens(subject.tokenizer, ui), display_tokens(subject.tokenizer, di)
            out.append({"promoted": [[t, sig(v)] for t, v in zip(up_tokens, uv)],
                        "suppressed": [[t, sig(-v)] for t, v in zip(down_tokens, dv)]})
    return out
