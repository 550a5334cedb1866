"""The journal of a compaction in progress: ``OUT/index/compaction.json``.

A compaction (store/compaction.py) first writes the journal, whole, naming each group it
will merge: the source parts and the target part. Then, per group, it writes the target
(proposal cache, instances, then images: the completion marker last) and deletes the
sources (images marker first). Last, it deletes the journal.

A kill at any point leaves OUT readable and repairable:

* target complete (its images file exists): its rows are the sources' rows, so the sources
  still there are hidden from every reader (``hidden``) and deleted by ``recover``;
* target incomplete: the target's files are deleted by ``recover``; the sources are whole.

Readers that do not hold OUT (export, report, a rematch planning from a cache) apply
``hidden``; a run holding OUT calls ``recover`` before it reads anything.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from refseg.pipeline.storage import Location
from refseg.pipeline.store.atomic import write_bytes
from refseg.pipeline.store.layout import IMAGES_DIR, INSTANCES_DIR, PROPOSALS_DIR
from refseg.pipeline.store.pool import delete_all, read_bytes

__all__ = ["INDEX_DIR", "JOURNAL", "Group", "hidden", "read_journal", "recover", "write_journal"]

log = logging.getLogger(__name__)

INDEX_DIR = "index"
JOURNAL = "compaction.json"
_FORMAT = "refseg-compaction-journal"


@dataclass(frozen=True)
class Group:
    """Parts ``sources`` merged into the part ``target`` (names like ``part-<key>.parquet``)."""

    target: str
    sources: tuple[str, ...]


def _loc(out: Location) -> Location:
    return out.child(INDEX_DIR, JOURNAL)


def write_journal(out: Location, groups: Iterable[Group]) -> None:
    """Record the groups of a compaction before any of its writes (whole-file write)."""
    body = {
        "format": _FORMAT,
        "version": 1,
        "groups": [{"target": g.target, "sources": list(g.sources)} for g in groups],
    }
    write_bytes(_loc(out), json.dumps(body).encode())


def read_journal(out: Location) -> list[Group]:
    """The groups of an unfinished compaction (none: ``[]``)."""
    try:
        data: Any = json.loads(read_bytes(_loc(out)))
    except FileNotFoundError:
        return []
    except ValueError as exc:  # cannot happen with whole-file writes; say so if it does
        raise ValueError(
            f"{_loc(out).uri} is not a compaction journal ({exc}): it was not written by "
            "refseg; delete it only if no part of OUT was merged by hand"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"{_loc(out).uri} is not a refseg compaction journal")
    return [Group(str(g["target"]), tuple(map(str, g["sources"]))) for g in data["groups"]]


def hidden(groups: list[Group], finished: Iterable[str]) -> set[str]:
    """Sources whose rows are in a complete target (the target's marker is finished)."""
    done = set(finished)
    return {s for g in groups if g.target in done for s in g.sources}


def recover(out: Location, finished: Iterable[str]) -> int:
    """Finish or undo an interrupted compaction; call it holding OUT's lock. Returns the
    number of groups repaired. ``finished``: names of the finished parts (images/ listing).

    The caller forgets the parts deleted here in the index first (store/index.py does).
    """
    groups = read_journal(out)
    if not groups:
        return 0
    done = set(finished)
    whole = [g for g in groups if g.target in done]
    delete_all([out.child(IMAGES_DIR, s) for g in whole for s in g.sources])  # markers first
    rest = [
        out.child(d, s) for g in whole for s in g.sources for d in (INSTANCES_DIR, PROPOSALS_DIR)
    ]
    cut = [
        out.child(d, g.target)
        for g in groups
        if g.target not in done
        for d in (INSTANCES_DIR, PROPOSALS_DIR)
    ]
    delete_all(rest + cut)
    delete_all([_loc(out)])
    log.warning("finished an interrupted compaction of %d groups of parts", len(groups))
    return len(groups)
