"""Text while it is generated: each choice's text so far, from its generated ids (the task's own ids -> text rule),
cut into deltas that join to exactly the text the finished result has.

Decoding the ids so far is not yet the final text's start: the last word may still grow (a WordPiece `##` piece, a
byte-level BPE token ending inside a UTF-8 character), and the tokenizer's cleanup may remove the space before a word
("dog ." -> "dog.", "' s" -> "'s"), even one word further back ("do n ' t" -> "don't"). So only the text before the
last whitespace is sent while decoding (before the one before it when the last settled word is such an "n"), and the
finished text's remainder at the end."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from blip.tasks.options import is_blip2
from blip.text_cleanup import CLEANUP_RULES

if TYPE_CHECKING:
    from blip.api import Blip

_logger = logging.getLogger(__name__)

_LAST_WORD = re.compile(r"\s+\S*\Z")  # the last whitespace run and what follows it
# Words the cleanup can still join to the word before them once the tokens after them arrive: the "n" of " n't"
# (its "'" and "t" are tokens of their own).
_JOINED_LATER = frozenset(before[1:].split("'")[0] for before, _ in CLEANUP_RULES if "'" in before[2:])


def partial_text(blip: Blip, task: str, prompt: str | None) -> Callable[[list[int]], str]:
    """generated ids -> the text so far of one result of `task` ("caption": continuing `prompt`; "vqa": an answer),
    by the rule the task's own results are made with."""
    if is_blip2(blip):
        from blip.tasks import blip2

        return blip2.partial_caption(blip, prompt) if task == "caption" else blip2.partial_answer(blip)
    from blip.tasks.caption import partial_caption

    return partial_caption(blip, prompt if task == "caption" else None)  # an answer: [DEC] + generated, decoded


def settled(text: str) -> str:
    """The part of a partial decode that more tokens cannot change: everything before its last whitespace."""
    last = _LAST_WORD.search(text)
    ready = text[: last.start()] if last else ""
    before = _LAST_WORD.search(ready)
    if before is not None and ready[before.start() :].lstrip() in _JOINED_LATER:
        return ready[: before.start()]
    return ready


class TextDeltas:
    """One choice's text in pieces: `update(text so far)` returns what can be sent now (maybe ""), `finish(final)` the
    rest; the pieces join to `final`."""

    def __init__(self) -> None:
        self.sent = ""

    def update(self, text: str) -> str:
        ready = settled(text)
        if len(ready) <= len(self.sent) or not ready.startswith(self.sent):
            return ""
        delta, self.sent = ready[len(self.sent) :], ready
        return delta

    def finish(self, final: str) -> str:
        if not final.startswith(self.sent):  # a tokenizer whose decode changed settled text: nothing to take back
            _logger.warning("streamed text %r is not the start of the final text %r", self.sent, final)
            return ""
        rest, self.sent = final[len(self.sent) :], final
        return rest
