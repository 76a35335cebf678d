"""Prompt logprobs (vLLM's `prompt_logprobs`, and the completions' `echo` with `logprobs`): the log-softmax of the
logits at every prompt position, for the requests that ask only, gathered across the steps of a prompt's prefill.

Prompt token p is scored by the logits at position p - 1. A step feeds each sequence's new_token_ids(), from
position num_cached on; the runner projects the rows of those that score a prompt token not scored yet, beside
each sequence's last row. So the entries are complete and in order whatever the prefill's path: one step, several chunks, or a
recomputation after preemption (which scores nothing again)."""
from __future__ import annotations

import torch

from .scheduler import Sequence


def positions(seq: Sequence) -> range:
    """The positions this step feeds whose logits score a prompt token still without its entry."""
    if seq.prompt_logprobs_n is None:
        return range(0)
    start = max(seq.num_cached, len(seq.prompt_logprobs) - 1)
    return range(start, min(seq.num_cached + len(seq.new_token_ids()), len(seq.prompt_ids) - 1))


def record(seqs: list[Sequence], logits: torch.Tensor) -> None:
    """Appends each sequence's entries, [logprob, rank, [[token, logprob], ...]]; logits holds the rows of
    positions(seq) for each of seqs in turn. One copy to the host for the whole step."""
    spans = [(seq, positions(seq)) for seq in seqs]
    targets = [seq.prompt_ids[q + 1] for seq, span in spans for q in span]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])
    rank = (logprobs > target).sum(dim=-1) + 1  # as vLLM ranks: 1 + how many tokens are more likely
    top = torch.topk(logprobs, max(seq.prompt_logprobs_n for seq, span in spans if span), dim=-1)
    target, rank, top_ids, top_values = (t.tolist() for t in (target[:, 0], rank, top.indices, top.values))
    row = 0
    for seq, span in spans:
        n = seq.prompt_logprobs_n
        for _ in span:
            seq.prompt_logprobs.append([target[row], rank[row], [list(a) for a in zip(top_ids[row][:n],
                                                                                   top_values[row][:n])]])
            row += 1


def finished(seq: Sequence) -> list | None:
    """What the request's first output carries: its prompt's entries, if it asked (the prefill is over by then)."""
    if seq.prompt_logprobs_n is None or seq.output_ids:
        return None
    if len(seq.prompt_logprobs) != len(seq.prompt_ids):
        raise AssertionError(f"request {seq.request_id}: {len(seq.prompt_logprobs)} prompt logprobs for "
                             f"{len(seq.prompt_ids)} prompt tokens")
    return seq.prompt_logprobs
