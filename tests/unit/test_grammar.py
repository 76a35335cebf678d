"""Structured outputs on the attention node (attention_node/grammar.py) with random logits in place of a model: the
mask makes every output follow its grammar, rows without one are left alone, a preemption keeps each matcher with
its outputs, and a complete grammar stops the sequence. Tool calls parsed from text (gateway/tools.py)."""
from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("xgrammar")

from expertmesh.attention_node.grammar import GrammarCompiler, tokenizer_info
from expertmesh.attention_node.sampler import sample_step
from expertmesh.attention_node.scheduler import Scheduler, Sequence
from expertmesh.gateway.text import TextCodec
from expertmesh.gateway.tools import ToolCallStream
from expertmesh.kv.block_manager import BlockManager
from expertmesh.transport.protocol import SamplingParams

EOS = 1
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"},
                                           "s": {"type": "string", "pattern": "[a-z]{16,20}"}},
          "required": ["n", "ok", "s"], "additionalProperties": False}


def test_grammars_hold_through_preemptions_and_end_their_sequences(mixtral_dir):
    vocab = json.loads((mixtral_dir / "config.json").read_text())["vocab_size"]
    compiler = GrammarCompiler(tokenizer_info(mixtral_dir, vocab, (EOS,)))
    codec = TextCodec(mixtral_dir)
    # two free sequences that need 31 blocks of 2 tokens each, then three with a grammar, in 40 blocks: the newest
    # (the JSON's, long enough to be preempted mid-object) are preempted and recomputed
    sched = Scheduler(BlockManager(40, 2), max_num_seqs=5, max_batch_tokens=64, context_len=64, eos_token_ids=(EOS,))
    grammars = [("regex", r"[a-c]{2}x\d"), ("ebnf", 'root ::= "yes" | "no"'), ("json_schema", json.dumps(SCHEMA))]
    seqs = []
    for i, grammar in enumerate([None, None, *grammars]):
        seq = Sequence(f"r{i}", [2, 3, 4], SamplingParams(max_tokens=60, temperature=1.0, ignore_eos=True), seed=i)
        seq.grammar = None if grammar is None else compiler.state(*grammar)
        sched.add(seq)
        seqs.append(seq)
    preempted, preempt = [], sched._preempt
    sched._preempt = lambda seq: (preempted.append((seq.request_id, len(seq.output_ids))), preempt(seq))
    reasons, generator = {}, torch.Generator().manual_seed(0)
    while sched.running or sched.waiting:
        batch = sched.schedule()
        logits = torch.randn(len(batch), vocab, generator=generator) * 3
        tokens, _ = sample_step(logits, batch, (EOS,))
        for seq, token in zip(batch, tokens):
            reasons[seq.request_id] = sched.advance(seq, token)
    assert any(rid == "r4" and 0 < outputs for rid, outputs in preempted), preempted  # mid-object
    texts = [codec.decode(s.output_ids[:-1]) for s in seqs]
    assert all(s.output_ids[-1] == EOS for s in seqs[2:]), texts  # each grammar ended on the stop token it allowed
    assert [reasons[s.request_id] for s in seqs] == ["length", "length", "stop", "stop", "stop"]
    assert re.fullmatch(r"[a-c]{2}x\d", texts[2]) and texts[3] in ("yes", "no")
    assert json.loads(texts[4]).keys() == {"n", "ok", "s"}
    assert len(seqs[0].output_ids) == len(seqs[1].output_ids) == 60  # no grammar: ignore_eos, up to max_tokens


def test_a_bad_grammar_is_refused_with_the_reason(mixtral_dir):
    compiler = GrammarCompiler(tokenizer_info(mixtral_dir, 512, (EOS,)))
    with pytest.raises(ValueError, match="regex"):
        compiler.state("regex", "(ab")


def test_tool_calls_are_parsed_from_streamed_text_whatever_its_split():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>not json</tool_call> <tool_ca')
    whole = ToolCallStream()
    whole.push(text, final=True)
    for size in (1, 3, 7):
        stream, content, calls = ToolCallStream(), "", []
        for at in range(0, len(text), size):
            piece, new = stream.push(text[at:at + size], final=at + size >= len(text))
            content += piece
            calls += stream.deltas(new)
        assert content == whole.content == "Let me check.\n\n<tool_call>not json</tool_call> <tool_ca"
        assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            (0, "get_weather", {"city": "Paris"}), (1, "get_time", {})]
