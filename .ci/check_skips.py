"""Fails CI on an unexpected skip: reads pytest's JUnit XML reports and checks every skip reason against an
allow-list.

Owns: the skip gate of `.ci/run`. Usage: `python .ci/check_skips.py REPORT.xml [...] [--allow FILE]`
(FILE: `.ci/allowed_skips.txt`, one regular expression per line, `#` comments). Prints each allowed reason
with its count; exits 1 listing every skip whose reason matches no line (with the tests it hit), 2 when a
report is missing or unreadable.

Does not own: which tests run (`.ci/run` does).
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

DEFAULT_ALLOW = Path(__file__).resolve().parent / "allowed_skips.txt"


def allow_patterns(path: Path) -> list[re.Pattern]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [re.compile(line) for line in lines if line and not line.startswith("#")]


def skips(report: Path) -> list[tuple[str, str]]:
    """[(test id, skip reason)] of one JUnit XML report (pytest --junitxml)."""
    out = []
    for case in ET.parse(report).getroot().iter("testcase"):
        for skipped in case.findall("skipped"):
            if skipped.get("type") == "pytest.xfail":
                continue
            test = f"{case.get('classname', '')}::{case.get('name', '')}"
            message, text = (skipped.get("message") or "").strip(), (skipped.text or "").strip()
            # a module-level skip (importorskip at import) is reported as 'collection skipped', its reason in the text
            out.append((test, text if message in ("", "collection skipped") else message))
    return out


def check(reports: list[Path], allow: list[re.Pattern]) -> tuple[collections.Counter, dict[str, list[str]]]:
    """(count per allowed reason, {unexpected reason: [tests]})."""
    allowed, unexpected = collections.Counter(), collections.defaultdict(list)
    for report in reports:
        for test, reason in skips(report):
            if any(p.search(reason) for p in allow):
                allowed[reason] += 1
            else:
                unexpected[reason].append(test)
    return allowed, dict(unexpected)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python .ci/check_skips.py", description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path, help="pytest --junitxml files")
    ap.add_argument("--allow", type=Path, default=DEFAULT_ALLOW, help="the allow-list (regular expressions)")
    a = ap.parse_args(argv)
    try:
        allowed, unexpected = check(a.reports, allow_patterns(a.allow))
    except (OSError, ET.ParseError) as e:
        print(f"check_skips: cannot read a report: {e}", file=sys.stderr)
        return 2
    for reason, n in sorted(allowed.items()):
        print(f"allowed skip x{n}: {reason}")
    for reason, tests in sorted(unexpected.items()):
        print(f"UNEXPECTED skip x{len(tests)}: {reason} ({', '.join(tests[:5])}{' ...' if len(tests) > 5 else ''})")
    if unexpected:
        print(f"check_skips: {sum(map(len, unexpected.values()))} test(s) skipped for reasons not in {a.allow}",
              file=sys.stderr)
        return 1
    print(f"check_skips: {sum(allowed.values())} skip(s), all allowed by {a.allow}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
