"""``harness checkpoint verify RUN_OR_TAG [--size-only]``: every checkpoint against its COMPLETE marker.

    harness checkpoint verify runs/tiny-cpu                              # every tag of the run
    harness checkpoint verify runs/tiny-cpu/checkpoints/step-00000060    # one tag

Prints OK or the failing files per tag; exit 0 when every complete tag is intact, 1 otherwise. It only
reads: resume is what sets a failing tag aside. No torch: this runs on a login node.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import SpecError
from harness.train.integrity import (
    MARKER,
    SET_ASIDE,
    TAG_RE,
    can_compute,
    checkpoints_dir,
    describe_problems,
    human_bytes,
    is_complete,
    read_marker,
    verify_tag,
)


def cmd_verify(args) -> int:
    """``harness checkpoint verify RUN_OR_TAG [--size-only]``: OK or the failures per tag; 0 if all OK."""
    source = Path(args.source)
    mode = "size" if args.size_only else "checksum"
    if TAG_RE.match(source.name) and source.is_dir():
        tags = [source]
    elif checkpoints_dir(source).is_dir():
        tags = sorted(p for p in checkpoints_dir(source).iterdir() if p.is_dir())
    else:
        fix = "give a run directory or a checkpoint tag directory (…/checkpoints/step-NNNNNNNN)"
        raise SpecError("RUN_DIR_OR_CHECKPOINT", str(source), fix, reason="no checkpoints there")
    num_ok = num_bad = 0
    for tag_dir in tags:
        if not TAG_RE.match(tag_dir.name):
            if SET_ASIDE in tag_dir.name:
                print(f"{tag_dir.name}: set aside after failing verification (resume ignores it)")
            continue
        if not is_complete(tag_dir):
            print(f"{tag_dir.name}: incomplete (no {MARKER} marker; resume ignores it)")
            if tag_dir == source:  # asked about this one tag: it is not a usable checkpoint
                num_bad += 1
            continue
        problems = verify_tag(tag_dir, mode)
        if problems:
            num_bad += 1
            print(f"{tag_dir.name}: FAILED: " + describe_problems(problems, limit=len(problems)))
        else:
            num_ok += 1
            print(f"{tag_dir.name}: OK ({_what_was_checked(tag_dir, mode)})")
    if num_ok + num_bad == 0:
        print(f"no complete checkpoint in {source}")
        return 1
    return 1 if num_bad else 0


def _what_was_checked(tag_dir: Path, mode: str) -> str:
    marker = read_marker(tag_dir)
    files = marker.get("files")
    if not isinstance(files, dict):
        return "written before checkpoints listed their files: nothing to compare"
    checked = "sizes"
    if mode == "checksum" and marker.get("checksum") and can_compute(marker["checksum"]):
        checked += f" and {marker['checksum']} checksums"
    return f"{len(files)} files, {human_bytes(marker.get('total_bytes', 0))}, {checked}"
