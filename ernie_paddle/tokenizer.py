"""The ERNIE tokenizer (SentencePiece `tokenizer.model`) and a streaming detokenizer.

No BOS is added (ERNIE's `add_bos_token: false`); special tokens written in the text (such as
`<|begin_of_sentence|>`) are matched whole. Decoding goes token -> bytes -> an incremental UTF-8
decoder, so a character split over several byte-fallback tokens is emitted only once complete.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

from .errors import ErnieError

BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class Tokenizer:
    def __init__(self, directory: str | Path):
        import sentencepiece as spm

        directory = Path(directory)
        model_file = directory / "tokenizer.model"
        if not model_file.is_file():
            raise ErnieError(f"{model_file}: not found; the model directory needs its SentencePiece tokenizer.model")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_file))
        except (OSError, RuntimeError) as e:
            raise ErnieError(f"{model_file}: not a SentencePiece model ({e})") from None
        config = _read_json(directory / "tokenizer_config.json")
        self.add_bos = bool(config.get("add_bos_token", False))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = max(self.sp.pad_id(), self.sp.unk_id(), 0)

        n = self.sp.GetPieceSize()
        self.special_ids = {i for i in range(n) if self.sp.IsControl(i) or self.sp.IsUnknown(i)}
        # User-defined symbols such as `<mask:1>` (SentencePiece matches them whole when encoding).
        special_text = {piece: i for i in range(n) if not self.sp.IsByte(i)
                        and (piece := self.sp.IdToPiece(i)).startswith("<") and piece.endswith(">")
                        and self.sp.EncodeAsIds(piece)[-1:] == [i]}
        special_text.update({p: self.sp.PieceToId(p) for p in _special_strings(config)
                             if self.sp.PieceToId(p) != self.sp.unk_id()})
        self.special_ids |= set(special_text.values())
        self.special_text = special_text
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(special_text, key=len, reverse=True))) + ")") \
            if special_text else None
        # Bytes each token stands for; special tokens stand for nothing in decoded text.
        self._bytes = [self._piece_bytes(i) for i in range(n)]

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def _piece_bytes(self, i: int) -> bytes:
        if i in self.special_ids:
            return b""
        piece = self.sp.IdToPiece(i)
        m = BYTE_PIECE.match(piece)
        if m and self.sp.IsByte(i):
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def encode(self, text: str) -> list[int]:
        ids = [self.bos_id] if self.add_bos else []
        parts = self._split.split(text) if self._split else [text]
        for part in parts:
            if part in self.special_text:
                ids.append(self.special_text[part])
            elif part:
                ids.extend(self.sp.EncodeAsIds(part))
        return ids

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token] if 0 <= token < len(self._bytes) else b""

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """ERNIE 4.5 instruct format: `<|begin_of_sentence|>User: ...\\nAssistant: ...<|end_of_sentence|>`."""
        out = "<|begin_of_sentence|>"
        for m in messages:
            if m["role"] == "system":
                out += f"{m['content']}\n"
            elif m["role"] == "user":
                out += f"User: {m['content']}\n"
            else:
                out += f"Assistant: {m['content']}<|end_of_sentence|>"
        return out + ("Assistant: " if add_generation_prompt else "")


class StreamingDetokenizer:
    """Feed token ids one at a time; `add` returns only text that is complete UTF-8."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self.decoder.decode(self.tokenizer.token_bytes(int(token)))

    def finish(self) -> str:
        return self.decoder.decode(b"", final=True)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ErnieError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _special_strings(config: dict) -> list[str]:
    """Special token strings named by tokenizer_config.json (plain strings or {"content": ...})."""
    found = []
    for key, value in config.items():
        if key.endswith("_token") and value:
            found.append(value["content"] if isinstance(value, dict) else value)
    for value in config.get("additional_special_tokens") or []:
        found.append(value["content"] if isinstance(value, dict) else value)
    for value in (config.get("added_tokens_decoder") or {}).values():
        if isinstance(value, dict) and value.get("content"):
            found.append(value["content"])
    return [s for s in found if isinstance(s, str)]
