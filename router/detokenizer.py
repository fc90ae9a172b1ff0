"""IncrementalDetokenizer: a sample's text, one token at a time, with stop strings.

Decoding goes through the tokenizers library's DecodeStream, which holds back bytes until they form whole UTF-8
characters, so no broken character is ever emitted. A few prompt tokens prime it, so that the first output token
decodes with its leading space as it would inside the text. Stop strings are searched in the newly decoded text
plus enough of the old to catch a stop string that spans tokens; while a sample runs, the last
(longest stop string - 1) characters are held back from the stream, since they may still begin a stop string.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from workers.sampling_params import SamplingParams

PROMPT_CONTEXT = 5  # prompt tokens that prime the decoder


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], params: SamplingParams):
        self.backend = tokenizer.backend_tokenizer
        self.stream = DecodeStream(ids=list(prompt_ids[-PROMPT_CONTEXT:]),
                                   skip_special_tokens=params.skip_special_tokens)
        self.stop = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # the output text so far; cut at a stop string once one is found
        self.emitted = 0  # characters of text already handed out

    def resume(self, token_ids: list[int], text_len: int) -> None:
        """Takes over a sample begun elsewhere: its tokens decoded again, of which text_len characters were
        handed out there (the rest, held back for stop strings, is still to come)."""
        for t in token_ids:
            self.add(t)
        self.emitted = min(text_len, len(self.text))

    def add(self, token_id: int) -> bool:
        """Decodes one more token; True if the text now contains a stop string (and was cut there)."""
        piece = self.stream.step(self.backend, token_id)
        if not piece:
            return False
        search_from = max(0, len(self.text) - self.hold)
        self.text += piece
        found = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if not found:
            return False
        i, s = min(found)
        self.text = self.text[: i + len(s) if self.include_stop else i]
        return True

    def delta(self, finished: bool) -> str:
        """Text not yet handed out; while running, what could still start a stop string stays back."""
        end = len(self.text) if finished or not self.stop else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
