"""ResumedSample: a sample that began on another engine (whose replica or workers died), to go on from its tokens."""

from __future__ import annotations

from typing import NamedTuple


class ResumedSample(NamedTuple):
    index: int  # which of the request's n samples
    token_ids: list[int]  # what it generated before
    text_len: int  # characters of its text the client already has
