"""Synthetic corpora of ``bench/corpus_scale.py``: OUTs in the real part layout, made fast.

Image ``i`` is ``/corpus/images/<i>.jpg`` (id: ``image_id_from_uri``, as a folder listing
gives it), 5 instances each (RLE strings of ``RLE_CHARS`` characters, scores in [0, 1]),
32 images per part, as the writer tasks make them (issue 19's measurement). ``generate``
writes the parts with the store's own part writer (``layout.write_table``) from whole
columns at once; ``label_batch`` is what a labelling batch hands the real writer.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
from refseg.core.instances import INSTANCES_SCHEMA
from refseg.pipeline.dataflow.writer import instances_blob
from refseg.pipeline.identity import Listing
from refseg.pipeline.schema import IMAGES_SCHEMA, Col, image_id_from_uri
from refseg.pipeline.storage import Location
from refseg.pipeline.store.layout import IMAGES_DIR, INSTANCES_DIR, part_key, write_table

__all__ = ["CATEGORIES", "PER_IMAGE", "PER_PART", "generate", "label_batch", "listing_of"]

CATEGORIES = [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]
PER_IMAGE, PER_PART = 5, 32
RLE_CHARS = 120  # a compact object mask's compressed RLE at a few hundred pixels a side
_RNG = np.random.default_rng(0)
_RLE = [
    "".join(chr(c) for c in _RNG.integers(48, 112, RLE_CHARS)).replace("\\", "0")
    for _ in range(257)
]


def listing_of(n: int) -> Listing:
    """The first ``n`` images of the corpus, as a folder listing gives them."""
    uris = [f"/corpus/images/{i:08d}.jpg" for i in range(n)]
    ids = np.fromiter((image_id_from_uri(u) for u in uris), np.int64, n)
    at = np.arange(n, dtype=np.int64)
    return Listing.of(uris, ids, 10_000 + at % 977, 1_700_000_000 * 10**9 + at)


def _tables(listing: Listing, rows: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """(images, instances) tables of the images at positions ``rows`` of the listing."""
    n = len(rows)
    ids = listing.ids[rows]
    uris = [listing.uris[k] for k in rows]
    images = pa.table(
        {
            Col.IMAGE_ID: ids,
            Col.IMAGE_URI: uris,
            Col.WIDTH: np.full(n, 640, np.int32),
            Col.HEIGHT: np.full(n, 480, np.int32),
            Col.STATUS: ["ok"] * n,
            Col.ERROR: pa.nulls(n, pa.string()),
            Col.N_INSTANCES: np.full(n, PER_IMAGE, np.int32),
            Col.SECONDS: np.full(n, 0.5),
            Col.T_DECODE: np.full(n, 0.01),
            Col.T_PROPOSE: np.full(n, 0.3),
            Col.T_MATCH: np.full(n, 0.15),
            Col.T_ENCODE: np.full(n, 0.04),
            Col.FILE_SIZE: listing.sizes[rows],
            Col.FILE_MTIME: listing.mtimes[rows],
        },
        schema=IMAGES_SCHEMA,
    )
    m = n * PER_IMAGE
    which = np.repeat(np.arange(n), PER_IMAGE)
    cats = (np.arange(m) % 2 + 1).astype(np.int64)
    seg = pa.StructArray.from_arrays(
        [
            pa.array([[480, 640]] * m, pa.list_(pa.int32())),
            pa.array([_RLE[int(i) % len(_RLE)] for i in ids[which] + np.arange(m)]),
        ],
        names=["size", "counts"],
    )
    bbox = np.tile(np.asarray([10.0, 20.0, 100.0, 80.0]), (m, 1))
    instances = pa.table(
        {
            "image_id": ids[which],
            "image_uri": [uris[k] for k in which],
            "category_id": cats,
            "category_name": [CATEGORIES[c - 1]["name"] for c in cats],
            "score": _RNG.random(m, dtype=np.float32),
            "bbox": pa.FixedSizeListArray.from_arrays(pa.array(bbox.ravel()), 4),
            "segmentation": seg,
            "area": np.full(m, 5000.0),
            "proposal_iou": np.full(m, 0.9, np.float32),
        },
        schema=INSTANCES_SCHEMA,
    )
    return images, instances


def generate(
    out: Location, listing: Listing, first: int, n: int, *, threads: int, per_part: int = PER_PART
) -> int:
    """Write images ``first .. first + n`` of ``listing`` as finished parts of ``per_part``
    images (instances part, then images part); return the number of parts."""

    def one(start: int) -> None:
        rows = np.arange(start, min(start + per_part, first + n))
        images, instances = _tables(listing, rows)
        name = f"part-{part_key(listing.ids[rows])}.parquet"
        write_table(out.child(INSTANCES_DIR, name), instances)
        write_table(out.child(IMAGES_DIR, name), images)

    starts = range(first, first + n, per_part)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, starts))
    return len(starts)


def label_batch(listing: Listing, rows: np.ndarray) -> dict[str, np.ndarray]:
    """What a labelling batch of the images at positions ``rows`` hands ``write_parts``."""
    images, instances = _tables(listing, rows)
    image_of = instances.column("image_id").to_numpy()
    blobs = [instances_blob(instances.filter(image_of == i)) for i in listing.ids[rows]]
    batch = {c: images.column(c).to_numpy(zero_copy_only=False) for c in images.column_names}
    batch[Col.ERROR] = np.asarray([""] * len(rows), dtype=object)
    batch[Col.INSTANCES] = np.asarray(blobs, dtype=object)
    return batch
