"""Pipeline overhead: ``refseg label`` on local Ray against a bare in-process loop.

One process, one run, both sides on the same images, models and output format:

* pipeline: ``refseg.pipeline.job.run_label`` (what ``refseg label`` calls) on a local Ray with
  ``--cpus`` CPUs and the default ``PipelineSettings``; on CPU these give one SAM2 actor
  and one DINOv2 actor with ``cpus`` torch threads each. Its time includes the actors'
  start-up (each builds its model), reading, decoding, writing parts, COCO JSON and run.json.
  Ray itself is started before the clock (as when a job connects to a running cluster),
  and a 2-image run first absorbs Ray Data's one-off session start-up (its system actors);
  both times are reported apart. ``startup_s`` is the time until the first batch reaches a
  model actor; ``steady`` figures count from there to the last batch (``ray.timeline()``).
* bare: ``refseg.core.segmenter.Segmenter`` in this process with ``--cpus`` torch threads
  (``--bare-threads 2 1`` runs it once per thread count and the ratios are taken against
  the fastest), one image at a time: read the file, decode and resize, SAM2 proposals,
  DINOv2 matching, RLE + Arrow encoding, and the same
  ``refseg.pipeline.dataflow.writer.write_parts`` every ``write_batch_size`` images. Its
  time includes building the two models once, as the actors do.

Stage seconds of the pipeline come from its per-image columns (decode, propose, match,
encode; each actor's batch time shared out over the batch's images) and, for write, from
Ray Data's execution stats (total remote wall time of the write tasks). Stage times are
wall times inside each stage: in the pipeline the stages overlap, so they do not add up
to the job's time. ``--pipeline`` runs several pipeline settings against the same bare loop.

    python bench/pipeline_overhead.py                     # 120 images of 480x640
    python bench/pipeline_overhead.py --n 64 --pipeline default torch_threads=1
    python bench/pipeline_overhead.py --bare-threads 2 1 --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import _common
import numpy as np
import torch
from _pipeline_probe import import_seconds, pipeline_run
from refseg.core.config import get_preset, replace
from refseg.core.factory import build_encoder, build_proposer
from refseg.core.imaging import decode_image, prepare_target
from refseg.core.matching import Matcher
from refseg.core.memory_bank import MemoryBank
from refseg.core.segmenter import Segmenter
from refseg.pipeline.dataflow.settings import PipelineSettings
from refseg.pipeline.dataflow.writer import instances_blob, write_parts
from refseg.pipeline.schema import Col, image_id_from_uri
from refseg.pipeline.storage import resolve

TARGET_RATIO = 0.9
STAGES = ("decode", "propose", "match", "encode", "write")


class _Clock:
    """Adds the wall time of wrapped calls to ``seconds[name]``."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)

    def wrap(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        return timed


def bare_loop(
    paths: list[Path], bank_path: str, out: str, model: Any, method: Any, threads: int
) -> dict[str, Any]:
    """The whole job in this process; returns seconds (total, build, per stage)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bank = MemoryBank.load(bank_path)
        seg = Segmenter(
            build_proposer(model, method), Matcher(build_encoder(model, method), bank, method)
        )
    build = time.perf_counter() - t0
    clock = _Clock()
    seg.proposer.propose = clock.wrap("propose", seg.proposer.propose)  # type: ignore[method-assign]
    seg.matcher.target_features = clock.wrap("match", seg.matcher.target_features)  # type: ignore[method-assign]
    seg.matcher.match = clock.wrap("match", seg.matcher.match)  # type: ignore[method-assign]
    loc = resolve(out)
    batch_size = PipelineSettings().write_batch_size
    pending: list[dict[str, Any]] = []
    n_instances = errors = 0

    def flush() -> None:
        cols = {k: np.asarray([r[k] for r in pending]) for k in pending[0]}
        for k in (Col.IMAGE_URI, Col.STATUS, Col.ERROR, Col.INSTANCES):
            cols[k] = np.asarray([r[k] for r in pending], dtype=object)
        write_parts(cols, out=loc)
        pending.clear()

    write = clock.wrap("write", flush)

    for path in paths:
        uri = str(path)
        t = time.perf_counter()
        image = decode_image(path.read_bytes(), uri=uri)
        target = prepare_target(image, seg.proposer.input_size, method.resize)
        t_decode = time.perf_counter() - t
        clock.seconds["decode"] += t_decode
        before = dict(clock.seconds)
        inst = seg.label_prepared([target])[0]
        t = time.perf_counter()
        image_id = image_id_from_uri(uri)
        status, error, blob = "ok", "", b""
        try:  # as MatchStage: a failure becomes an error row
            blob = instances_blob(
                inst.with_rles(drop_masks=True).to_arrow(image_id, uri, bank.names)
            )
            n_instances += len(inst)
        except Exception as exc:
            status, error = "error", str(exc)
            errors += 1
        t_encode = time.perf_counter() - t
        clock.seconds["encode"] += t_encode
        pending.append(
            {
                Col.IMAGE_ID: image_id,
                Col.IMAGE_URI: uri,
                Col.WIDTH: image.shape[1],
                Col.HEIGHT: image.shape[0],
                Col.STATUS: status,
                Col.ERROR: error,
                Col.INSTANCES: blob,
                Col.N_INSTANCES: len(inst) if status == "ok" else 0,
                Col.T_DECODE: t_decode,
                Col.T_PROPOSE: clock.seconds["propose"] - before["propose"],
                Col.T_MATCH: clock.seconds["match"] - before["match"],
                Col.T_ENCODE: t_encode,
            }
        )
        if len(pending) == batch_size:
            write()
    if pending:
        write()
    total = time.perf_counter() - t0
    return {
        "seconds": total,
        "build_seconds": build,
        "loop_seconds": total - build,
        "images": len(paths),
        "errors": errors,
        "instances": n_instances,
        "stage_seconds": clock.seconds,
    }


def parse_settings(spec: str) -> PipelineSettings:
    """``default`` or comma-separated ``field=value`` overrides of ``PipelineSettings``."""
    if spec == "default":
        return PipelineSettings()
    values: dict[str, Any] = {}
    for item in spec.split(","):
        key, _, raw = item.partition("=")
        if key not in PipelineSettings.__dataclass_fields__:
            raise SystemExit(f"unknown PipelineSettings field {key!r} in --pipeline {spec!r}")
        values[key] = float(raw) if "." in raw else int(raw)
    return PipelineSettings(**values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--n", type=int, default=120, help="images (a ratio from one run of a real job size)"
    )
    p.add_argument("--image-size", default="480x640", help="image HxW")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPU budget of both")
    p.add_argument(
        "--pipeline",
        nargs="+",
        default=["default"],
        metavar="SPEC",
        help="pipeline settings to run, each 'default' or PipelineSettings overrides such as "
        "'torch_threads=2,proposal_batch_size=1'; the first gives the headline ratio",
    )
    p.add_argument(
        "--bare-threads",
        type=int,
        nargs="+",
        default=None,
        help="torch threads of the bare loop, one run each (default: --cpus); the ratio is "
        "taken against the fastest",
    )
    p.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="label 2 images on Ray first, untimed (Ray Data's one-off session start-up)",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat both sides (order alternates)")
    p.add_argument("--bare-first", action="store_true", help="run the bare loop first")
    p.add_argument("--out-dir", default=None, help="JSON folder (default bench/results)")
    args = p.parse_args(argv)
    import ray

    hw = tuple(int(v) for v in args.image_size.lower().split("x"))
    preset = get_preset("tiny")
    model, method = replace(preset.model, random_weights=True), preset.method
    configs = {f"pipeline[{spec}]": parse_settings(spec) for spec in args.pipeline}
    machine = _common.machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = _common.write_images(root / "images", args.n, hw)  # type: ignore[arg-type]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bank = str(_common.tiny_bank(root / "bank.safetensors", model, method))
        imports = import_seconds()
        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        first_run = None
        if args.warmup:  # Ray Data's one-off session start (its system actors), untimed
            warm = root / "warmup"
            warm.mkdir()
            for path in paths[:2]:
                (warm / path.name).write_bytes(path.read_bytes())
            first_run = pipeline_run(
                warm, bank, str(root / "out_warmup"), model, method, PipelineSettings()
            )["seconds"]
        bares = {f"bare[threads={t}]": t for t in args.bare_threads or [args.cpus]}
        rounds: list[dict[str, Any]] = []
        for rnd in range(args.rounds):
            # alternate the order so that neither side always runs first
            order = [*configs, *bares]
            if (rnd % 2 == 1) != args.bare_first:
                order.reverse()
            results: dict[str, Any] = {}
            for side in order:
                load = _common.loadavg()
                out = str(root / f"out_{rnd}_{len(results)}")
                if side in bares:
                    r = bare_loop(paths, bank, out, model, method, bares[side])
                else:
                    r = pipeline_run(root / "images", bank, out, model, method, configs[side])
                r["loadavg_before"], r["loadavg_after"] = load, _common.loadavg()
                results[side] = r
                print(f"  round {rnd}, {side}: {r['images']} images in {r['seconds']:.1f} s")
            rounds.append(results)
        ray.shutdown()
    rows, stage_rows, ratios, steady_ratios = [], [], [], []
    for rnd, results in enumerate(rounds):
        for r in results.values():
            r.setdefault("startup_seconds", r.get("build_seconds"))
            r.setdefault("steady_seconds", r.get("loop_seconds"))
        best = min(results[b]["seconds"] for b in bares)  # the fastest bare loop
        best_steady = min(results[b]["steady_seconds"] for b in bares)
        for side in [*configs, *bares]:
            r = results[side]
            n = r["images"]
            row: dict[str, Any] = {"round": rnd, "side": side, "images": n, "errors": r["errors"]}
            row["seconds"] = r["seconds"]
            row["images_per_s"] = n / r["seconds"]
            row["startup_s"] = r["startup_seconds"] if r["startup_seconds"] is not None else ""
            steady = r["steady_seconds"]
            row["steady_images_per_s"] = n / steady if steady else ""
            row["load"] = max(r["loadavg_before"][:1] + r["loadavg_after"][:1], default="")
            if side in configs:
                row["ratio"] = best / r["seconds"]
                row["steady_ratio"] = best_steady / steady if steady else ""
                if side == next(iter(configs)):
                    ratios.append(row["ratio"])
                    steady_ratios.append(row["steady_ratio"])
            rows.append(row)
            stage_rows.append({"round": rnd, "side": side})
            for stage in STAGES:
                v = r["stage_seconds"].get(stage)
                stage_rows[-1][f"{stage}_ms/img"] = "" if v is None else v / n * 1e3
    print(_common.table(rows))
    print("\nstage wall time per image (ms; pipeline stages overlap):")
    print(_common.table(stage_rows))
    steady_ok = [v for v in steady_ratios if v != ""]
    print(
        f"\nratio pipeline/fastest bare loop, median of {len(ratios)} round(s): end to end "
        f"{statistics.median(ratios):.3f}, steady state "
        f"{statistics.median(steady_ok) if steady_ok else float('nan'):.3f} "
        f"(target >= {TARGET_RATIO}); not counted: Ray start-up {ray_start:.1f} s, warm-up run "
        f"{first_run or 0:.1f} s; "
        f"importing refseg.pipeline.dataflow.stages in a fresh process {imports:.1f} s; "
        f"load now {_common.loadavg()}"
    )
    return _common.finish(
        __file__,
        "pipeline_overhead",
        {
            "target_ratio": TARGET_RATIO,
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "steady_ratio": statistics.median(steady_ok) if steady_ok else None,
            "steady_ratios": steady_ratios,
            "ray_start_seconds": ray_start,
            "warmup_run_seconds": first_run,
            "import_stages_seconds": imports,
            "image_hw": hw,
            "cpus": args.cpus,
            "settings": {k: dataclasses.asdict(v) for k, v in configs.items()},
            "rounds": rounds,
            "rows": rows,
            "stage_rows": stage_rows,
            "machine": machine,
        },
        argv,
        args.out_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
