"""Structured outputs at the gateway: OpenAI's `response_format` and vLLM's `guided_*` fields (and their newer
`structured_outputs` object) as the one grammar source the attention node compiles and enforces
(SamplingParams.grammar; attention_node/grammar.py). Each source is parsed here first, so that a bad schema or regex
is a 400 naming its field rather than a failed generation."""
from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ResponseFormatSchema(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str = "response"
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")  # "schema" shadows a BaseModel member
    strict: bool | None = None  # xgrammar enforces the schema whatever this says


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: ResponseFormatSchema | None = None  # with type json_schema


class StructuredOutputs(BaseModel):
    """vLLM's StructuredOutputsParams: exactly one of these (its tuning fields are ignored)."""
    model_config = ConfigDict(strict=True, extra="ignore")
    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None


class GrammarFieldError(ValueError):
    """A structured-output field that asks for something impossible; param names it (the 400's param)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def choice_grammar(choices: list[str], param: str) -> str:
    """EBNF whose sentences are exactly the choices (vLLM's guided_choice); JSON string escapes are xgrammar's too."""
    if not choices:
        raise GrammarFieldError(param, "needs at least one choice")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _grammar(param: str, kind: str, value: Any) -> list[str]:
    """[kind, source] for SamplingParams.grammar from one field's value; kind as vLLM's structured_outputs names it."""
    if kind == "json":
        if isinstance(value, dict):
            return ["json_schema", json.dumps(value)]
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            raise GrammarFieldError(param, f"not a JSON schema: {exc}") from None
        return ["json_schema", value]
    if kind == "choice":
        return ["ebnf", choice_grammar(value, param)]
    if kind == "json_object":
        return ["json_object", ""]
    return [{"regex": "regex", "grammar": "ebnf", "structural_tag": "structural_tag"}[kind], value]


def requested_grammar(body: Any) -> tuple[str, list[str]] | None:
    """(the field that asked, [kind, source]) from a request's structured-output fields, None when none asks;
    GrammarFieldError when two ask at once (vLLM refuses that too) or one is malformed."""
    asked: list[tuple[str, str, Any]] = []  # (field, kind, value)
    response_format: ResponseFormat | None = body.response_format
    if response_format is not None and response_format.type == "json_object":
        asked.append(("response_format", "json_object", True))
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.json_schema is None:
            raise GrammarFieldError("response_format", "type json_schema needs json_schema.schema")
        asked.append(("response_format", "json", response_format.json_schema.json_schema))
    for kind in ("json", "regex", "choice", "grammar"):
        if getattr(body, f"guided_{kind}") is not None:
            asked.append((f"guided_{kind}", kind, getattr(body, f"guided_{kind}")))
    outputs: StructuredOutputs | None = body.structured_outputs
    if outputs is not None:
        given = [(kind, value) for kind, value in (("json", outputs.json_), ("regex", outputs.regex),
                                                     ("choice", outputs.choice), ("grammar", outputs.grammar),
                                                     ("json_object", outputs.json_object or None),
                                                     ("structural_tag", outputs.structural_tag)) if value is not None]
        if len(given) != 1:
            raise GrammarFieldError("structured_outputs", f"needs exactly one of json, regex, choice, grammar, "
                                    f"json_object, structural_tag; got {[k for k, _ in given] or 'none'}")
        asked.append(("structured_outputs", *given[0]))
    if len(asked) > 1:
        raise GrammarFieldError(asked[1][0], f"only one structured output per request; {asked[0][0]} asks too")
    return (asked[0][0], _grammar(*asked[0])) if asked else None


def check_grammar(param: str, grammar: list[str]) -> None:
    """Parses the grammar source as the node will (xgrammar, without compiling it for the vocabulary)."""
    import xgrammar as xgr  # imported at the first structured request: a gateway that serves none never pays for it
    kind, source = grammar
    parse = {"json_schema": xgr.Grammar.from_json_schema, "json_object": lambda _: None, "regex": xgr.Grammar.from_regex,
             "ebnf": xgr.Grammar.from_ebnf, "structural_tag": xgr.Grammar.from_structural_tag}[kind]
    try:
        parse(source)
    except RuntimeError as exc:  # xgrammar's parse errors, its log prefix ("[time] file.cc:line: ") dropped
        raise GrammarFieldError(param, re.sub(r"^\[[\d:]+\] \S+: ", "", str(exc)).strip()) from None

