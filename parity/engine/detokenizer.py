"""Incremental detokenization for stop strings: each sampled token's new characters, and vLLM's check.

Only requests with `stop` strings get one. Each step decodes just the new token against a few tokens
of context (the `tokenizers` library's DecodeStream, a Rust prefix/read-offset window: a few
microseconds a token, independent of the output's length), and searches for a stop string only where it
could end inside the new characters. It runs on the host after the step's single device-to-host copy,
so the GPU never waits on a decode. Characters are kept as a list of pieces plus the short tail the
search needs, so a long output costs O(length) in all, not O(length^2).

vLLM's meanings: stop strings are looked for once more than `min_tokens` tokens exist; the first stop
string of the list found ends the sample; the text is cut before it, or after it with
`include_stop_str_in_output`. The token ids are not cut.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str], include_stop_str_in_output: bool):
        self._backend = self.backend_of(tokenizer)
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stop = stop
        self._include = include_stop_str_in_output
        self._keep = max(len(s) for s in stop) - 1  # characters before the new ones a stop string can start in
        self._pieces: list[str] = []
        self._tail = ""
        self._num_chars = 0

    @staticmethod
    def backend_of(tokenizer):
        """The tokenizer's `tokenizers` backend; ValueError if it has none (a request with stop strings is refused)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                "stop strings need a tokenizer backed by the `tokenizers` library (a fast tokenizer); "
                f"got {type(tokenizer).__name__}"
            )
        return backend

    @property
    def text(self) -> str:
        """Everything decoded so far (after a stop, the cut text)."""
        return "".join(self._pieces)

    def step(self, token_id: int, check_stop: bool = True) -> str | None:
        """Add one sampled token; with `check_stop`, return the stop string its characters complete (the text
        is then cut as vLLM cuts it) or None."""
        piece = self._stream.step(self._backend, token_id)
        if not piece:
            return None
        self._pieces.append(piece)
        window = self._tail + piece
        window_start = self._num_chars - len(self._tail)
        self._num_chars += len(piece)
        self._tail = window[-self._keep :] if self._keep else ""
        if not check_stop:
            return None
        for stop in self._stop:
            at = window.find(stop, max(0, len(window) - len(piece) - len(stop) + 1))
            if at != -1:
                self._cut(window_start + at + (len(stop) if self._include else 0))
                return stop
        return None

    def _cut(self, num_chars: int) -> None:
        self._pieces = [self.text[:num_chars]]
        self._num_chars = num_chars
