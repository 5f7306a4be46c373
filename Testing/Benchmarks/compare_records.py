"""Do new benchmark results reproduce the committed records? Dice within 0.01, PSNR within 0.2 dB.

    python Testing/Benchmarks/compare_records.py bench-results              # against Testing/Benchmarks/results
    python Testing/Benchmarks/compare_records.py NEW_DIR --records OLD_DIR

Every benchmark JSON in NEW_DIR is compared with the record of the same name: each number whose key path names a
Dice ("dice", "mean_dice", "WT", "TC", "ET" under a Dice table) or a PSNR ("psnr", "_db") is checked against its
bound, and exit codes and tooth counts must be equal; times and memory are not compared (they depend on the
machine's load). Exit 1 when any is out of bounds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RECORDS = Path(__file__).resolve().parent / "results"
BOUNDS = {"dice": 0.01, "psnr_db": 0.2, "count": 0}
COUNTS = ("exit_code", "extra_teeth", "teeth_claimed_without_teeth", "teeth_evaluated")  # must stay exactly
SKIP = ("time", "seconds", "wall", "rss", "load_av", "eta", "_s")


def kind(path: tuple) -> str | None:
    """"dice", "psnr_db", "count" or None for the number at ``path`` (its keys, outermost first)."""
    keys = [str(k).lower() for k in path]
    last = keys[-1]
    if last in COUNTS:
        return "count"
    if any(s in last for s in SKIP) or "gain" in last or "target" in last:
        return None
    if "psnr" in last or last.endswith("_db") or any("psnr" in k for k in keys[-2:]):
        return "psnr_db"
    if "ssim" in last:
        return None
    if "dice" in last or any("dice" in k for k in keys) or last in ("wt", "tc", "et"):
        return "dice"
    return None


def numbers(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, (*path, i))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, float(obj)


def compare(old: dict, new: dict) -> tuple:
    """(checked, [(path, kind, old, new)] out of bounds, [paths of the record missing from the new result])."""
    got = dict(numbers(new))
    checked, bad, missing = 0, [], []
    for path, value in numbers(old):
        k = kind(path)
        if k is None:
            continue
        if path not in got:
            missing.append("/".join(map(str, path)))
            continue
        checked += 1
        if abs(got[path] - value) > BOUNDS[k] + 1e-9:
            bad.append(("/".join(map(str, path)), k, value, got[path]))
    return checked, bad, missing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("new", type=Path, help="folder of new benchmark JSON files")
    ap.add_argument("--records", type=Path, default=RECORDS)
    a = ap.parse_args(argv)
    failed = 0
    for f in sorted(a.new.glob("*.json")):
        rec = a.records / f.name
        if f.name == "summary.json" or not rec.is_file():
            continue
        checked, bad, missing = compare(json.loads(rec.read_text()), json.loads(f.read_text()))
        failed += bool(bad)
        print(json.dumps({"benchmark": f.stem, "numbers_checked": checked, "out_of_bounds": bad,
                          "missing": missing[:5]}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
