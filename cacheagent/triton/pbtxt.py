"""A small reader of the protobuf text format, as used by Triton's config.pbtxt.

It needs no schema: it returns every field in order, so a checker can look at
the fields it knows and report the ones it does not. The syntax it accepts is
protobuf's own: ``name: value``, nested messages in ``{ }`` (or ``< >``, with
or without the colon), repeated fields written again or as ``[ ... ]`` lists,
strings in ``"..."`` or ``'...'`` with C escapes (adjacent strings join),
numbers, enum identifiers and ``#`` comments to the end of the line.

Malformed input never escapes as anything but :class:`PbtxtError`, which
names the line and column, because its message ends up in front of a user
who has to fix the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Union

from cacheagent.errors import CacheAgentError

# protobuf's own parser stops at 100 levels of nesting; so do we, and that
# also keeps hostile input from exhausting Python's stack.
MAX_DEPTH = 100

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[fF]?")
_SIMPLE_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "v": "\v",
    "\\": "\\",
    "'": "'",
    '"': '"',
    "?": "?",
}
_CLOSE = {"{": "}", "<": ">"}


class PbtxtError(CacheAgentError, ValueError):
    """The text is not valid protobuf text format; the message names line and column."""

    def __init__(self, message: str, line: int = 0, column: int = 0) -> None:
        where = f"line {line}, column {column}: " if line else ""
        super().__init__(where + message)
        self.line = line
        self.column = column


class Identifier(str):
    """An unquoted word used as a value: an enum name such as ``KIND_GPU``, or ``true``."""

    __slots__ = ()


Value = Union[str, int, float, "Message"]


@dataclass(frozen=True)
class Field:
    """One occurrence of a field: its name, its value and the line it starts on."""

    name: str
    value: Value
    line: int


@dataclass
class Message:
    """A message: its fields in the order they appear, repeated fields once per value."""

    fields: list[Field] = field(default_factory=list)

    def all(self, name: str) -> list[Value]:
        """Every value of ``name``, in order (a ``[a, b]`` list counts as two values)."""
        return [f.value for f in self.fields if f.name == name]

    def first(self, name: str, default: Value | None = None) -> Value | None:
        """The first value of ``name``, or ``default``."""
        for f in self.fields:
            if f.name == name:
                return f.value
        return default

    def message(self, name: str) -> Message | None:
        """The first value of ``name`` if it is a message, else None."""
        value = self.first(name)
        return value if isinstance(value, Message) else None

    def has(self, name: str) -> bool:
        """True if ``name`` appears at least once."""
        return any(f.name == name for f in self.fields)

    def names(self) -> list[str]:
        """The distinct field names, in order of first appearance."""
        return list(dict.fromkeys(f.name for f in self.fields))

    def line_of(self, name: str) -> int:
        """The line where ``name`` first appears, or 0."""
        return next((f.line for f in self.fields if f.name == name), 0)

    def lines_of(self, name: str) -> list[int]:
        """The line of every occurrence of ``name``."""
        return [f.line for f in self.fields if f.name == name]

    def to_python(self) -> dict[str, object]:
        """A plain dict: one value per field, or a list where a field occurs more than once."""
        out: dict[str, object] = {}
        for name in self.names():
            values = [_plain(v) for v in self.all(name)]
            out[name] = values[0] if len(values) == 1 else values
        return out


def _plain(value: Value) -> object:
    return value.to_python() if isinstance(value, Message) else value


def parse(text: str | bytes) -> Message:
    """Parse protobuf text format into a :class:`Message`; raise PbtxtError if malformed."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PbtxtError(
                f"the file is not valid UTF-8 (byte {exc.start}); save it as UTF-8 text"
            ) from None
    if not isinstance(text, str):
        raise PbtxtError(f"expected text, got {type(text).__name__}")
    return _Parser(text).parse()


@dataclass(frozen=True)
class _Token:
    kind: str  # "ident", "number", "string", "punct", "eof"
    text: str
    value: object
    line: int
    column: int


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.line_start = 0

    def error(self, message: str, line: int | None = None, column: int | None = None) -> PbtxtError:
        return PbtxtError(
            message,
            self.line if line is None else line,
            self.pos - self.line_start + 1 if column is None else column,
        )

    def tokens(self) -> Iterator[_Token]:
        text = self.text
        while True:
            self._skip_space_and_comments()
            if self.pos >= len(text):
                yield _Token("eof", "", None, self.line, self.pos - self.line_start + 1)
                return
            line, column = self.line, self.pos - self.line_start + 1
            char = text[self.pos]
            if char in "\"'":
                yield _Token("string", char, self._string(char), line, column)
                continue
            if char in "{}<>[]:,;-":
                self.pos += 1
                yield _Token("punct", char, char, line, column)
                continue
            number = _NUMBER.match(text, self.pos)
            if number and char not in "_" and not char.isalpha():
                end = number.end()
                if end < len(text) and (text[end].isalnum() or text[end] in "_."):
                    raise self.error(f"malformed number {text[self.pos : end + 1]!r}")
                value = _number(number.group())
                if value is None:
                    raise self.error(f"{number.group()!r} is not a valid octal number")
                self.pos = end
                yield _Token("number", number.group(), value, line, column)
                continue
            ident = _IDENT.match(text, self.pos)
            if ident:
                self.pos = ident.end()
                yield _Token("ident", ident.group(), ident.group(), line, column)
                continue
            raise self.error(f"unexpected character {char!r}")

    def _skip_space_and_comments(self) -> None:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char == "\n":
                self.pos += 1
                self.line += 1
                self.line_start = self.pos
            elif char in " \t\r\f\v":
                self.pos += 1
            elif char == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                return

    def _string(self, quote: str) -> str:
        text = self.text
        start_line, start_col = self.line, self.pos - self.line_start + 1
        self.pos += 1
        out = bytearray()
        while True:
            if self.pos >= len(text) or text[self.pos] == "\n":
                raise self.error(
                    f"string opened with {quote} is not closed on its line", start_line, start_col
                )
            char = text[self.pos]
            if char == quote:
                self.pos += 1
                # Escapes may spell bytes that are no UTF-8; keep them rather than fail here.
                return out.decode("utf-8", "surrogateescape")
            if char != "\\":
                out += char.encode("utf-8", "surrogatepass")
                self.pos += 1
                continue
            self.pos += 1
            if self.pos >= len(text):
                raise self.error("the file ends inside a string escape")
            esc = text[self.pos]
            if esc in _SIMPLE_ESCAPES:
                out += _SIMPLE_ESCAPES[esc].encode()
                self.pos += 1
            elif esc in "01234567":
                digits = re.match(r"[0-7]{1,3}", text[self.pos : self.pos + 3])
                assert digits is not None
                code = int(digits.group(), 8)
                if code > 0xFF:
                    raise self.error(f"octal escape \\{digits.group()} is larger than one byte")
                out.append(code)
                self.pos += len(digits.group())
            elif esc in "xX":
                digits = re.match(r"[0-9a-fA-F]{1,2}", text[self.pos + 1 : self.pos + 3])
                if digits is None:
                    raise self.error("\\x must be followed by hex digits")
                out.append(int(digits.group(), 16))
                self.pos += 1 + len(digits.group())
            elif esc in "uU":
                width = 4 if esc == "u" else 8
                digits = re.fullmatch(
                    f"[0-9a-fA-F]{{{width}}}", text[self.pos + 1 : self.pos + 1 + width]
                )
                code = int(digits.group(), 16) if digits else -1
                if not 0 <= code <= 0x10FFFF:
                    raise self.error(
                        f"\\{esc} must be followed by {width} hex digits of a code point"
                    )
                out += chr(code).encode("utf-8", "surrogatepass")
                self.pos += 1 + width
            else:
                raise self.error(f"unknown escape \\{esc} in a string")


def _number(text: str) -> int | float | None:
    lowered = text.lower()
    if lowered.startswith("0x"):
        return int(lowered, 16)
    if lowered.endswith("f") or "." in lowered or "e" in lowered:
        return float(lowered.rstrip("f"))
    if len(lowered) > 1 and lowered.startswith("0"):
        # protobuf reads a leading zero as octal, like C.
        return int(lowered, 8) if lowered.isdigit() and set(lowered) <= set("01234567") else None
    return int(lowered)


class _Parser:
    def __init__(self, text: str) -> None:
        self.lexer = _Lexer(text)
        self.tokens = self.lexer.tokens()
        self.token = next(self.tokens)

    def error(self, message: str, token: _Token | None = None) -> PbtxtError:
        token = token or self.token
        return PbtxtError(message, token.line, token.column)

    def advance(self) -> _Token:
        token = self.token
        self.token = next(self.tokens)
        return token

    def is_punct(self, char: str) -> bool:
        return self.token.kind == "punct" and self.token.text == char

    def expect(self, char: str, what: str) -> None:
        if not self.is_punct(char):
            raise self.error(f"expected '{char}' {what}, found {_describe(self.token)}")
        self.advance()

    def parse(self) -> Message:
        return self.message(None, 0)

    def message(self, close: str | None, depth: int) -> Message:
        if depth > MAX_DEPTH:
            raise self.error(f"messages nested deeper than {MAX_DEPTH} levels")
        message = Message()
        while True:
            token = self.token
            if token.kind == "eof":
                if close is not None:
                    raise self.error(f"the file ends before the closing '{close}'")
                return message
            if token.kind == "punct" and token.text == close:
                self.advance()
                return message
            if token.kind == "punct" and token.text == "[":
                raise self.error(
                    "extension and Any field names in [brackets] are not used in Triton configs"
                )
            if token.kind != "ident":
                raise self.error(f"expected a field name, found {_describe(token)}")
            self.advance()
            self.field(message, token, depth)
            # protobuf allows an optional ',' or ';' after each field.
            if self.is_punct(",") or self.is_punct(";"):
                self.advance()

    def field(self, message: Message, name: _Token, depth: int) -> None:
        colon = self.is_punct(":")
        if colon:
            self.advance()
        if self.is_punct("["):
            for value in self.list(name, colon, depth):
                message.fields.append(Field(name.text, value, name.line))
            return
        if self.is_punct("{") or self.is_punct("<"):
            message.fields.append(Field(name.text, self.nested(depth), name.line))
            return
        if not colon:
            raise self.error(
                f"expected ':' after field '{name.text}', found {_describe(self.token)}"
            )
        message.fields.append(Field(name.text, self.scalar(name.text), name.line))

    def nested(self, depth: int) -> Message:
        opener = self.advance().text
        return self.message(_CLOSE[opener], depth + 1)

    def list(self, name: _Token, colon: bool, depth: int) -> list[Value]:
        self.advance()  # "["
        values: list[Value] = []
        if self.is_punct("]"):
            self.advance()
            return values
        while True:
            if self.is_punct("{") or self.is_punct("<"):
                values.append(self.nested(depth))
            elif not colon:
                # Without the colon protobuf only accepts a list of messages.
                raise self.error(
                    f"expected ':' before a list of values for field '{name.text}'"
                    f" (found {_describe(self.token)})"
                )
            else:
                values.append(self.scalar(name.text))
            if self.is_punct("]"):
                self.advance()
                return values
            self.expect(",", f"or ']' in the list of field '{name.text}'")

    def scalar(self, name: str) -> Value:
        token = self.token
        if token.kind == "string":
            parts = []
            while self.token.kind == "string":
                parts.append(str(self.advance().value))
            return "".join(parts)
        if token.kind == "number":
            self.advance()
            assert isinstance(token.value, (int, float))
            return token.value
        if token.kind == "ident":
            self.advance()
            return Identifier(token.text)
        if token.kind == "punct" and token.text == "-":
            self.advance()
            after = self.token
            if after.kind == "number":
                self.advance()
                assert isinstance(after.value, (int, float))
                return -after.value
            if after.kind == "ident" and after.text.lower() in ("inf", "infinity", "nan"):
                self.advance()
                return Identifier("-" + after.text)
            raise self.error(f"expected a number after '-' for field '{name}'", after)
        raise self.error(f"expected a value for field '{name}', found {_describe(token)}")


def _describe(token: _Token) -> str:
    if token.kind == "eof":
        return "the end of the file"
    if token.kind == "string":
        return "a string"
    return f"'{token.text}'"
