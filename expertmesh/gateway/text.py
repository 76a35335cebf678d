"""Text <-> token ids at the gateway: prompts, the chat template, and incremental detokenization with stops.

Streaming and non-streaming responses go through the same `TextStream`, so their texts are equal."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer


class TextCodec:
    def __init__(self, model_dir: str | Path) -> None:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {str(model_dir)!r}: the gateway needs one to serve text")
        self.tokenizer = Tokenizer.from_file(str(path))
        config_path = Path(model_dir) / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.chat_template: str | None = config.get("chat_template")
        self._compiled = None  # the template, compiled at first use
        self.bos_token: str = config.get("bos_token") or ""
        self.eos_token: str = config.get("eos_token") or ""
        self.vocab_size = self.tokenizer.get_vocab_size()
        # the special ids, which decode skips: they add no text wherever they stand
        self.skipped_ids = frozenset(i for i, token in self.tokenizer.get_added_tokens_decoder().items()
                                     if token.special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """add_special_tokens: the tokenizer's own (its BOS, say), as transformers' tokenizers add by default."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The tokenizer's own Jinja chat template if it has one (given the tools, as transformers' would be), else a
        plain role-tagged transcript, with the tools and tool calls in Hermes' syntax (gateway/tools.py)."""
        if self.chat_template:
            return self._template().render(messages=messages, tools=tools, add_generation_prompt=True,
                                           bos_token=self.bos_token, eos_token=self.eos_token)
        from .tools import plain_tool_calls, plain_tools_prompt
        if tools:
            system = "\n\n".join(m["content"] for m in messages[:1] if m["role"] == "system")
            messages = [{"role": "system", "content": "\n\n".join(filter(None, [system, plain_tools_prompt(tools)]))},
                        *(messages[1:] if system else messages)]
        turns = "".join(f"<|{m['role']}|>\n{m['content']}{plain_tool_calls(m.get('tool_calls') or [])}\n"
                        for m in messages)
        return turns + "<|assistant|>\n"

    def _template(self):
        """The chat template compiled as transformers compiles it: a sandbox, loop controls, tojson without HTML
        escapes, raise_exception (tool-aware templates use all of these)."""
        if self._compiled is None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str):
                raise jinja2.exceptions.TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
                json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.chat_template)
        return self._compiled


@dataclass
class TextDelta:
    text: str
    stopped: bool  # a stop string was found: the text ends before it and generation must end


HOLD_BACK_IDS = 8  # ids held back past which TextStream takes the text that can no longer change


class TextStream:
    """Turns a growing list of generated ids into text deltas, holding back what may still change:
    an incomplete UTF-8 character, or a tail that could be the start of a stop string.

    Each push decodes only the ids since the last complete piece, with the piece before them as context, and
    keeps the difference (vLLM's incremental detokenization): decoding every id again at each token made a
    token's cost grow with the output, 17% of the gateway's CPU at 64-128 tokens (py-spy). The special ids, which
    decode skips, stay out of the window (a random-weight model's picks are mostly such ids, and held back, they
    made the window grow with the output again: benchmarks/RESULTS.md, sixteenth session)."""

    def __init__(self, codec: TextCodec, stop: list[str], min_tokens: int = 0) -> None:
        self.codec = codec
        self.stop = [s for s in stop if s]
        # vLLM's min_tokens: the text of the first min_tokens tokens is not searched for stop strings (one may
        # still begin there and end after)
        self.min_tokens = min_tokens
        self._searched_from = 0
        self.tokens = 0  # ids pushed, special ones included
        self.emitted = ""
        self._ids: list[int] = []  # the ids pushed that decode keeps
        self.text = ""  # the text of _ids[:self._read], which ends on a whole character
        self._prefix = self._read = 0  # _ids[_prefix:_read]: the context decoded again with the new ids

    def push(self, token_ids: list[int], final: bool) -> TextDelta:
        self.tokens += len(token_ids)
        self._ids += [t for t in token_ids if t not in self.codec.skipped_ids]
        if len(self._ids) > self._read or final:  # else only special ids came: no text changes
            context = self.codec.decode(self._ids[self._prefix:self._read])
            window = self.codec.decode(self._ids[self._prefix:])
            # a multi-byte character not complete yet decodes to U+FFFD: wait for its next ids (unless it is the end)
            if len(window) > len(context) and (final or not window.endswith("\ufffd")):
                self.text += window[len(context):]
                self._prefix, self._read = self._read, len(self._ids)
            elif len(self._ids) - self._read > HOLD_BACK_IDS:
                self._settle(context, window)
        text = self.text
        if self.tokens <= self.min_tokens:
            self._searched_from = len(text)
        for stop in self.stop if self.tokens > self.min_tokens else ():
            at = text.find(stop, max(0, max(len(self.emitted), self._searched_from) - len(stop) + 1))
            if at >= 0:
                return self._emit(text[:at], stopped=True)
        if not final and self.stop:
            text = text[:max(len(self.emitted), len(text) - max(len(s) for s in self.stop) + 1)]
        return self._emit(text, stopped=False)

    def _settle(self, context: str, window: str) -> None:
        """Bytes that no character completes (a logit_bias forcing stray byte tokens, say) would keep the window
        growing, each push decoding all of it again: quadratic, 0.8 s of a gateway's CPU over 4096 such ids. A
        character is at most 4 bytes, and an id decode keeps at least one, so the text before the last 4 ids is
        final: take it, at a cut no character spans (the window begins with the cut's text)."""
        end = len(self._ids)
        for cut in range(end - 4, max(self._read, end - 8), -1):
            head = self.codec.decode(self._ids[self._prefix:cut])
            if head.startswith(context) and window.startswith(head):
                self.text += head[len(context):]
                self._prefix, self._read = self._read, cut
                return

    def _emit(self, text: str, stopped: bool) -> TextDelta:
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text if text.startswith(self.emitted) else self.emitted
        return TextDelta(delta, stopped)
