"""A payload that arrives one section at a time, so the merge never holds all of it at once.

Why: the agent holds config.xml's parsed tree (about five times the file in memory). Decoding
a whole fast-path request first put a second tree of the same size beside it (a 20 MB sync
peaked at ~14x the config). Read section by section, each section's elements are parsed,
merged (moved into config.xml's tree) and let go of before the next is read, so the incoming
side costs about its largest section.

`PayloadParts` is what the fast path's decoder hands the merge (`wire.streamed` builds one):
its keys are the payload's top-level keys (what a revision text and the handlers' checks read),
`parts` yields each section as a payload of its own, and `whole` gives the one payload the
decoder would have built instead (the merge falls back to it where a section at a time would
not merge, validate and report exactly as the whole does: `streamable`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from lxml import etree

from hasync.config.items import SyncItemRegistry
from hasync.core.errors import MergeError
from hasync.payload.build import place_at
from hasync.payload.validate import check_payload


def top_keys(sections: Sequence[str]) -> list[str]:
    """The top-level keys a payload of `sections` has, in its order."""
    return list(dict.fromkeys(section.split(".")[0] for section in sections))


class PayloadParts(dict[str, Any]):
    """The top-level keys of a payload whose sections come one at a time (values: None; read
    `parts`). Subclasses provide `parts` and `whole`; only one of them is called, once."""

    def __init__(self, sections: Sequence[str]) -> None:
        super().__init__(dict.fromkeys(top_keys(sections)))
        self.sections = list(sections)
        # the dicts already built of what the merge moved from the parts into config.xml,
        # element -> its dict (`tree.Grafts.moved`, shared by all parts): the agent digests
        # those without converting them again
        self.moved: dict[etree._Element, dict[str, Any]] = {}
        self.as_sent = True  # False: no part carries the primary's `tree.SentSections`
        self.token = ""  # the request's `tree.SentSections.token`, where parts carry them

    def parts(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Each section (its dotted path) as a payload of its own (a `tree.GraftedPayload` where it
        has grafts), in order; raises once the whole request turns out bad, possibly after its
        last part: the merge must take every part, and then writes nothing."""
        raise NotImplementedError

    def whole(self) -> dict[str, Any]:
        """The whole payload at once, as the decoder builds it without parts."""
        raise NotImplementedError


def payload_order(sections: Sequence[str]) -> list[str]:
    """`sections` in the order a payload of them lists them (its nested structs, depth first):
    the fast path sends them so, and the agent can then merge them a section at a time
    (`streamable`). The payload is the same either way (`build.place_at` keeps each level's
    first-seen order). As they are where one lies inside another: there the order decides
    what `place_at` builds."""
    split = [section.split(".") for section in sections]
    return list(sections) if _nested(split) else _leaves(_skeleton(split), "")


def streamable(sections: Sequence[str], registry: SyncItemRegistry) -> list[str] | None:
    """The points (`validate.check_payload`) of a payload of `sections` when merging it a section
    at a time does exactly what merging it whole does; else None.

    That holds when no section lies inside another or comes twice (each part then holds what no
    other touches), they come in the order the whole payload's nested structs list them
    (`payload_order`: so parts merge, warn and report in the whole's order), and every one is
    covered by a registered item (its points then follow from the paths alone, not from what
    the sections hold, and nothing merges as unknown).
    """
    split = [section.split(".") for section in sections]
    if _nested(split) or len(set(sections)) != len(sections):
        return None
    skeleton = _skeleton(split)
    if _leaves(skeleton, "") != list(sections):
        return None
    try:
        return check_payload(skeleton, registry)  # (refuses an uncovered section: no unknown points)
    except MergeError:
        return None  # the whole payload's merge gives the error


def enclosing(split: list[list[str]]) -> list[list[str]]:
    """Of sections split at their dots, those another one lies inside."""
    return [parts for parts in split if any(len(other) > len(parts) and other[: len(parts)] == parts
                                            for other in split)]


def _nested(split: list[list[str]]) -> bool:
    return bool(enclosing(split))


def _skeleton(split: list[list[str]]) -> dict[str, Any]:
    """A payload's nested structs for sections at `split`, with None where each section's value goes."""
    skeleton: dict[str, Any] = {}
    for parts in split:
        place_at(skeleton, parts, None)
    return skeleton


def _leaves(node: dict[str, Any], prefix: str) -> list[str]:
    found: list[str] = []
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        found.extend(_leaves(value, path) if isinstance(value, dict) else [path])
    return found
