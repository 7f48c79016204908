"""Tokenizer and chat template from the artifact: tokenizers for BPE, a sandboxed Jinja for templates."""

from __future__ import annotations

import json
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .format import KrsError


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _raise(message: str):
    raise TemplateError(message)


class Tokenizer:
    def __init__(self, tokenizer_json: bytes, config: dict, chat_template: str | None,
                 generation_config: dict | None = None):
        try:
            self.hf = HFTokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON
            raise KrsError(f"corrupt artifact: the tokenizer does not load ({e})") from e
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template = chat_template
        self.eos_token_ids = self._eos_ids(generation_config or {})
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)

    def _eos_ids(self, generation_config: dict) -> set[int]:
        ids = generation_config.get("eos_token_id")
        ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        if self.eos_token is not None and self.hf.token_to_id(self.eos_token) is not None:
            ids.add(self.hf.token_to_id(self.eos_token))
        return ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise KrsError("this model has no chat template: use --no-chat and a raw prompt")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda v, indent=None, ensure_ascii=False: json.dumps(
            v, indent=indent, ensure_ascii=ensure_ascii)
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        except TemplateError as e:
            raise KrsError(f"chat template failed: {e}") from e

    def stream(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Text deltas as tokens arrive, never splitting a multi-byte UTF-8 character across deltas."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read])
        after = decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        decode = self.tokenizer.decode
        tail = decode(self.ids[self.prefix:])[len(decode(self.ids[self.prefix:self.read])):]
        self.prefix = self.read = len(self.ids)
        return tail


class StopStrings:
    """Holds back text that could still become a stop string; reports when one appears."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        self.pending += delta
        for stop in self.stops:
            at = self.pending.find(stop)
            if at >= 0:
                out, self.pending = self.pending[:at], ""
                return out, True
        keep = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
