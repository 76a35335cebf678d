"""Tool calling on chat: the conversation and tools as the chat template takes them, `required` and named
`tool_choice` as a grammar the attention node enforces, and the model's output parsed into OpenAI's `tool_calls`.

The syntax is Qwen3's and Hermes': each call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.
A forced call is xgrammar's structural tag for that format (tags whose body is the function's parameters schema),
so the same parser reads forced and free calls, streamed or whole."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from .schema import ChatMessage, NamedToolChoice, Tool

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: an assistant's tool calls with their arguments as objects (Qwen's and
    Hermes' templates write them with tojson; vLLM parses them the same way), a tool message's call id kept."""
    out = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments_object(c.function.arguments)}} for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # not JSON: the template writes it as it came


def tool_dicts(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    return None if not tools else [t.model_dump(exclude_none=True) for t in tools]


def plain_tools_prompt(tools: list[dict[str, Any]]) -> str:
    """The tools' part of a system turn for tokenizers without a chat template (Hermes' wording, shortened)."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False, separators=(",", ":")) for t in tools)
    return (f"Tools:\n<tools>\n{listed}\n</tools>\nTo call one, answer "
            f'{OPEN}\n{{"name": <name>, "arguments": <arguments object>}}\n{CLOSE}')


def plain_tool_calls(calls: list[dict[str, Any]]) -> str:
    """An assistant's earlier calls in the model's syntax, for tokenizers without a chat template."""
    return "".join(f"{OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']}, ensure_ascii=False)}\n{CLOSE}"
                   for c in calls)


def tool_choice_of(tools: list[Tool] | None, choice: str | NamedToolChoice | None) -> str | NamedToolChoice:
    """OpenAI's default: auto with tools, none without. ValueError for a choice the tools cannot meet."""
    if choice is None:
        return "auto" if tools else "none"
    if choice != "none" and not tools:
        raise ValueError(f"tool_choice {_name(choice)!r} needs tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
        raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
    return choice


def _name(choice: str | NamedToolChoice) -> str:
    return choice if isinstance(choice, str) else choice.function.name


def forced_calls_grammar(tools: list[Tool], choice: str | NamedToolChoice, parallel: bool) -> list[str] | None:
    """For `required` or a named function, the structural tag (SamplingParams.grammar) that admits only calls in
    the model's syntax with arguments that follow their parameters schema; None for auto and none."""
    if choice in ("auto", "none"):
        return None
    import xgrammar as xgr  # imported at the first forced call (gateway/structured.py checks grammars with it too)
    choice_dict = choice if isinstance(choice, str) else choice.model_dump()
    # reasoning disabled: the call comes at once (vLLM's forced calls skip a thinking block the same way); one
    # whitespace character at most between JSON tokens, else a model may write whitespace until max_tokens
    tag = xgr.get_model_structural_tag("qwen_3", tools=tool_dicts(tools), tool_choice=choice_dict,
                                       reasoning="disabled", parallel_tool_calls=parallel, max_whitespace_cnt=1)
    return ["structural_tag", tag.model_dump_json()]


def parse_call(body: str) -> dict[str, Any] | None:
    """OpenAI's tool call from the JSON between the tags; None if it is not one."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _held_back(text: str) -> int:
    """How many characters at text's end could begin the opening tag (wait for more before sending them)."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ToolCallStream:
    """Splits a choice's text, as it grows, into content and tool calls: a call leaves once its closing tag has
    come, content up to anything that may still open one. A call whose JSON does not parse, or left open at the
    end, stays content (the text is never lost)."""
    text: str = ""
    read: int = 0  # text[:read] is settled: sent as content or parsed as calls
    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)

    def push(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """The content and the calls text adds."""
        self.text += text
        content, calls = "", []
        while True:
            start = self.text.find(OPEN, self.read)
            if start < 0:
                end = len(self.text) if final else len(self.text) - _held_back(self.text[self.read:])
                content += self.text[self.read:end]
                self.read = end
                break
            content += self.text[self.read:start]
            self.read = start
            close = self.text.find(CLOSE, start)
            if close < 0:
                if final:
                    content += self.text[start:]
                    self.read = len(self.text)
                break
            call = parse_call(self.text[start + len(OPEN):close])
            if call is None:
                content += self.text[start:close + len(CLOSE)]
            else:
                calls.append(call)
            self.read = close + len(CLOSE)
        self.content += content
        self.calls += calls
        return content, calls

    def deltas(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Stream deltas of calls just parsed (push's), indexed among all of this choice's calls."""
        first = len(self.calls) - len(calls)
        return [{"index": first + i, **call} for i, call in enumerate(calls)]
