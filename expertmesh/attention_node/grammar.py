"""Structured outputs on the attention node: a request's grammar compiled once per distinct source (xgrammar), and
each sequence's matcher, which sees every sampled token and fills the row's token bitmask before each step.

Why xgrammar: it is the engine vLLM and SGLang use. It compiles a JSON schema, regex, EBNF grammar or structural tag
into a pushdown automaton with most of each state's token mask precomputed for the tokenizer, so a step costs a
bitmask fill per constrained row (microseconds on the host, no wait on the device) and a masked_fill on the device
(ops/grammar_mask.py). The node, not the gateway, compiles: the compiled grammar is tied to the vocabulary the node
samples from and is far larger than its source, so only the source travels (SamplingParams.grammar) and the node
keeps xgrammar's compile cache. The gateway checks that the source parses, so a bad schema is a 400 there.

A matcher lives in its Sequence beside output_ids and accepts exactly them, in the one place outputs grow
(Sequence.append): a preemption by recomputation keeps both, so the readmitted sequence resumes with its matcher
where its outputs left it, with nothing to replay or roll back."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import xgrammar as xgr

from ..transport.protocol import GRAMMAR_KINDS

log = logging.getLogger(__name__)


class GrammarError(ValueError):
    """A grammar source that does not compile."""


def tokenizer_info(model_dir: str | Path, vocab_size: int, stop_token_ids: tuple[int, ...]) -> xgr.TokenizerInfo:
    """xgrammar's view of the checkpoint's tokenizer.json (read with `tokenizers`, as the gateway does), over the
    model's vocabulary (the logits' width, which may pass the tokenizer's: those ids are never allowed)."""
    from tokenizers import Tokenizer
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise GrammarError(f"no tokenizer.json in {str(model_dir)!r}: structured outputs need the tokenizer")
    tokenizer = Tokenizer.from_file(str(path))
    encoded_vocab = [""] * vocab_size
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if token_id < vocab_size:
            encoded_vocab[token_id] = token
    # the vocabulary's encoding (byte-level, byte fallback, raw) and prefix space, as from_huggingface detects them
    metadata = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.to_str())
    return xgr.TokenizerInfo(encoded_vocab, vocab_type=metadata["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=list(stop_token_ids) or None, add_prefix_space=metadata["add_prefix_space"])


class GrammarCompiler:
    """Compiles grammar sources for one tokenizer; xgrammar's cache keeps each distinct source's compiled grammar
    (bounded), so a schema many requests share compiles once."""

    def __init__(self, info: xgr.TokenizerInfo, cache_limit_bytes: int = 256 << 20) -> None:
        self.info = info
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_limit_bytes=cache_limit_bytes)

    def compile(self, kind: str, source: str) -> xgr.CompiledGrammar:
        try:
            # JSON without free whitespace (separators ", " and ": "): where any is allowed, a model can write
            # whitespace until max_tokens and never close the object (vLLM's disable_any_whitespace is for that)
            if kind == "json_schema":
                return self.compiler.compile_json_schema(source, any_whitespace=False)
            if kind == "json_object":  # any object, as its name says
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return self.compiler.compile_regex(source)
            if kind == "ebnf":
                return self.compiler.compile_grammar(source)
            if kind == "structural_tag":
                return self.compiler.compile_structural_tag(source)
        except (RuntimeError, ValueError, json.JSONDecodeError) as exc:
            raise GrammarError(f"the {kind} grammar does not compile: {exc}") from None
        raise GrammarError(f"grammar kind {kind!r} is none of {GRAMMAR_KINDS}")

    def state(self, kind: str, source: str) -> "GrammarState":
        return GrammarState(self.compile(kind, source))


class GrammarState:
    """One sequence's place in its grammar."""

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self.compiled = compiled
        self.matcher = xgr.GrammarMatcher(compiled)
        self.rejected = False  # a token the mask did not allow was sampled (every logit masked): the output ends

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token sampled, or it cannot go on: the sequence stops."""
        return self.rejected or self.matcher.is_terminated()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the tokens allowed next into row of bitmask ([rows, words] int32 on the host)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        if not self.rejected and not self.matcher.accept_token(token):
            # only when no token was allowed, e.g. min_tokens masking the stop token of a complete grammar
            log.warning("grammar rejected sampled token %d: the output ends here", token)
            self.rejected = True
