"""Chat templates: a conversation rendered to text as transformers renders it, and to ids with a loss mask
decided by the rendered turns' boundaries.

The template
    A Jinja template of the kind ``tokenizer_config.json`` carries as ``chat_template`` (a preset:
    configs/chat/ja-chatml.jinja). It is rendered as transformers' ``apply_chat_template`` renders it: a
    sandbox with ``trim_blocks`` and ``lstrip_blocks``, loop controls, ``raise_exception(message)``,
    ``strftime_now(format)`` and a ``tojson`` filter that keeps non-ASCII text and does not escape HTML;
    its variables are ``messages``, ``add_generation_prompt`` and the tokenizer's ``bos_token``,
    ``eos_token``, ``unk_token`` and ``pad_token``.

What the loss is taken on
    The template marks it: the text inside ``{% generation %} ... {% endgeneration %}`` blocks (the
    blocks transformers reads for ``return_assistant_tokens_mask``), normally each assistant turn's
    content and its end-of-turn piece. A template without such a block is refused: the mask is never
    guessed by searching the ids for a response marker, which goes wrong when a marker tokenizes
    differently in context (trl#1183).

Ids
    The rendered text is cut at every boundary of a generation block and at every special token the
    template wrote through its variables (``{{ eos_token }}`` gives the EOS id, not the characters
    ``</s>``). Each run of text between two special tokens is encoded whole, as transformers encodes the
    text between added tokens; it must equal its pieces encoded one by one, so that a boundary is a
    token boundary, else the example is refused, naming where the tokenizer merges the text across it.
    A token is a loss token when it lies inside a generation block.

Special pieces
    Every ``<|name|>`` the template writes must be a user-defined piece of the tokenizer: SentencePiece
    and the exported fast tokenizer (:mod:`hataori.tokenizer.hf`) both match those in text as written, so
    that ``apply_chat_template`` gives hataori's ids. ``hataori tokenizer extend BASE --pieces ...``
    adds them to a tokenizer.

Rendering is done here for training data, generation prompts and export alike.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hataori.errors import HataoriError, InputError
from hataori.tokenizer import proto as spm_proto
from hataori.tokenizer.model import Tokenizer

TEMPLATE_FILE = "chat_template.jinja"
"""The template's file name in a tokenizer folder or an export (transformers reads the same name)."""
ROLES = ("system", "user", "assistant")
SPECIAL_PIECE = re.compile(r"<\|[^|<>\s]+\|>")
"""How a special piece is spelled in a template: ``<|name|>``."""
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Markers put into the rendered text and taken out again: the start and end of a generation block, and
# one per special token variable. They are code points of the last private use plane, refused in input.
_OPEN, _CLOSE = "\U0010fff0", "\U0010fff1"
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_SPECIAL_MARKS = {name: chr(0x10FFF2 + i) for i, name in enumerate(_SPECIAL_NAMES)}
_MARKERS = re.compile("[\U0010fff0-\U0010fffd]")


class ChatError(HataoriError):
    """A conversation or template that cannot be turned into training ids, with where and why."""


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of rendered text, or one special token (``token_id``), inside a generation block or not."""

    text: str
    loss: bool
    token_id: int | None = None


@dataclass(slots=True)
class Encoded:
    """A conversation's ids and, for each, whether it is a loss token (inside a generation block)."""

    ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)

    @property
    def loss_tokens(self) -> int:
        return sum(self.mask)


class ChatTemplate:
    """A loaded chat template: its source, where it came from, and its compiled form."""

    def __init__(self, source: str, origin: str | Path):
        self.source, self.origin = source, str(origin)
        if not GENERATION_TAG.search(source):
            raise InputError(origin, "the chat template marks no text with {% generation %} ... "
                             "{% endgeneration %}, so hataori cannot tell which tokens the loss counts; wrap each "
                             "assistant turn's content and its end-of-turn piece in such a block (see "
                             "configs/chat/ja-chatml.jinja)")
        self.template = _compile(source, origin)
        self.special_pieces = sorted(set(SPECIAL_PIECE.findall(source)))

    @classmethod
    def load(cls, path: str | Path) -> "ChatTemplate":
        """From a ``.jinja`` file, a folder holding ``chat_template.jinja`` (a tokenizer, a run's
        tokenizer copy, an export), or a ``tokenizer_config.json`` whose ``chat_template`` is a string."""
        path = Path(path)
        if path.is_dir():
            path = path / TEMPLATE_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(path, "no such chat template; give a .jinja file (configs/chat/ja-chatml.jinja), a "
                             f"folder holding {TEMPLATE_FILE}, or a tokenizer_config.json") from None
        except UnicodeDecodeError as err:
            raise InputError(path, f"not UTF-8 text: {err}") from None
        if path.suffix == ".json":
            try:
                text = json.loads(text)["chat_template"]
            except (ValueError, KeyError, TypeError):
                raise InputError(path, "holds no chat_template string; give the model's chat_template.jinja or a "
                                 "template of your own") from None
            if not isinstance(text, str):
                raise InputError(path, "chat_template is a list of named templates; save the one to use as a "
                                 ".jinja file and give that")
        return cls(text, path)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Every ``<|name|>`` the template writes must be a user-defined piece of ``tokenizer``."""
        proto = spm_proto.parse(tokenizer.proto, tokenizer.path)
        user = {p.piece for p in proto.pieces if p.type == spm_proto.USER_DEFINED}
        missing = [piece for piece in self.special_pieces if piece not in user]
        if missing:
            pieces = ",".join(missing)
            raise InputError(self.origin, f"writes {', '.join(missing)}, which tokenizer {tokenizer.path} does not "
                             "hold as pieces of their own (text would spell them piece by piece); add them with "
                             f"`hataori tokenizer extend {tokenizer.path.parent} --pieces '{pieces}' --output DIR` "
                             "and use that tokenizer")

    def segments(self, messages: list[dict], tokenizer: Tokenizer, *, add_generation_prompt: bool = False,
                 where: str = "") -> list[Segment]:
        """The rendered conversation cut into text and special tokens, each inside a generation block or not."""
        ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "unk_token": tokenizer.sp.unk_id(),
               "pad_token": tokenizer.pad_id}
        variables = {name: mark for name, mark in _SPECIAL_MARKS.items() if ids[name] >= 0}
        text = self._render(messages, add_generation_prompt, variables, where)
        by_mark = {mark: ids[name] for name, mark in variables.items()}
        out: list[Segment] = []
        loss, start = False, 0
        for match in _MARKERS.finditer(text):
            if match.start() > start:
                out.append(Segment(text[start:match.start()], loss))
            mark = match.group()
            if mark == _OPEN:
                loss = True
            elif mark == _CLOSE:
                loss = False
            else:
                token = by_mark[mark]
                out.append(Segment(tokenizer.sp.id_to_piece(token), loss, token))
            start = match.end()
        if start < len(text):
            out.append(Segment(text[start:], loss))
        return out

    def render(self, messages: list[dict], tokenizer: Tokenizer, *, add_generation_prompt: bool = False) -> str:
        """The conversation as text, special tokens spelled, as ``apply_chat_template(tokenize=False)`` gives it."""
        return "".join(s.text for s in self.segments(messages, tokenizer, add_generation_prompt=add_generation_prompt))

    def encode(self, messages: list[dict], tokenizer: Tokenizer, *, add_generation_prompt: bool = False,
               where: str = "") -> Encoded:
        """The conversation's ids and loss mask (module docstring); ``where`` names it in errors (file:line)."""
        segments = self.segments(messages, tokenizer, add_generation_prompt=add_generation_prompt, where=where)
        encoded = Encoded()
        run: list[Segment] = []
        for segment in segments + [Segment("", False, -1)]:  # a final special flushes the last run
            if segment.token_id is None:
                if segment.text:
                    run.append(segment)
                continue
            _encode_run(run, tokenizer, encoded, where or self.origin)
            run = []
            if segment.token_id >= 0:
                encoded.ids.append(segment.token_id)
                encoded.mask.append(segment.loss)
        return encoded

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        """The ids that end an assistant turn: the last token of a generation block when it is a special piece
        or EOS (``<|im_end|>`` in the preset); generation stops there. Found by encoding a probe conversation."""
        probe = [{"role": "user", "content": "質問"}, {"role": "assistant", "content": "答え"}]
        encoded = self.encode(probe, tokenizer, where="the chat template's probe conversation")
        last = max((i for i, m in enumerate(encoded.mask) if m), default=None)
        if last is None:
            return []
        token = encoded.ids[last]
        special = token in (tokenizer.eos_id,) or tokenizer.sp.id_to_piece(token) in self.special_pieces
        return [token] if special else []

    def _render(self, messages: list[dict], add_generation_prompt: bool, variables: dict, where: str) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError as err:
            raise ChatError(f"{where or 'a conversation'}: the chat template {self.origin} fails to render it: "
                            f"{err}") from None


def _encode_run(run: list[Segment], tokenizer: Tokenizer, encoded: Encoded, where: str) -> None:
    """Encode text between two special tokens whole, after checking that its pieces encode alone to the
    same ids (every loss boundary a token boundary)."""
    if not run:
        return
    whole = tokenizer.encode(["".join(s.text for s in run)])[0]
    parts = tokenizer.encode([s.text for s in run]) if len(run) > 1 else [whole]
    if sum(parts, []) != whole:
        cut = next((i for i in range(len(run) - 1) if not _is_prefix(
            tokenizer.encode(["".join(s.text for s in run[:i + 1])])[0], whole)), 0)
        before, after = run[cut].text[-20:], run[cut + 1].text[:20]
        raise ChatError(f"{where}: the tokenizer merges text across the boundary of a generation block "
                        f"({before!r} | {after!r}), so no token boundary separates what the loss counts from what "
                        "it does not; end the text before the boundary with a piece of its own (a newline or a "
                        "<|name|> piece) in the chat template, or change the message")
    for segment, part in zip(run, parts):
        encoded.ids.extend(part)
        encoded.mask.extend([segment.loss] * len(part))


def _is_prefix(ids: list[int], whole: list[int]) -> bool:
    return whole[:len(ids)] == ids


def _compile(source: str, origin: str | Path):
    """The template compiled in transformers' environment (module docstring), with generation blocks
    rendered between two markers."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller) -> str:
            return _OPEN + caller() + _CLOSE

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise InputError(origin, f"the chat template does not parse: {err.message}", line=err.lineno) from None


# ----------------------------------------------------------------------------- conversations


def check_messages(messages: Any, where: str, *, needs_assistant: bool = True) -> list[dict]:
    """``messages`` as a list of ``{role, content}`` dicts, checked: known roles, string contents, the system
    turn first if any, and (``needs_assistant``) at least one assistant turn. ``where`` names the record."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where}: messages must be a non-empty list of {{role, content}} objects, got "
                        f"{_preview(messages)}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"{where}: messages[{i}] is {_preview(message)}, not a {{role, content}} object")
        for key in ("role", "content"):
            if key not in message:
                keys = ", ".join(map(str, message)) or "none"
                raise ChatError(f"{where}: messages[{i}] has no {key!r} (keys: {keys})")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ChatError(f"{where}: messages[{i}].role is {role!r}; the roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"{where}: messages[{i}].content is {_preview(content)}, not a string")
        if _MARKERS.search(content):
            raise ChatError(f"{where}: messages[{i}].content holds a code point of U+10FFF0..U+10FFFD, which hataori "
                            "uses to mark turn boundaries while rendering; remove it")
        if role == "system" and i > 0:
            raise ChatError(f"{where}: messages[{i}] is a system turn after the first; a conversation has at most "
                            "one, first")
    if needs_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ChatError(f"{where}: no assistant turn, so nothing to learn from; add one or drop the conversation")
    return messages


def _preview(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."
