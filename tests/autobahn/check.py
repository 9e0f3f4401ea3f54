#!/usr/bin/env python3
"""Checks an Autobahn|Testsuite fuzzingclient report of the gateway against the pass rule and
the recorded expectation (see run.sh).

    check.py REPORTS/index.json expected.json MAX_MESSAGE_BYTES [--update]

Agents: `gatehouse` (through the gateway) and `direct` (the same echo server without it).
A case passes when the gateway's result (overall and for the close) is OK, or is the same
NON-STRICT/INFORMATIONAL result the direct server gets, or the case sends a message larger
than MAX_MESSAGE_BYTES (from the case's description) and the gateway closed with 1009.
Then every case must match expected.json (behaviour, close behaviour, close code).
"""
import json
import os
import re
import sys
from collections import Counter

ACCEPTED_IF_SAME = {"NON-STRICT", "INFORMATIONAL"}
SIZE = re.compile(r"(?:payload of length|payload size) (\d+)(?: \* 2\*\*(\d+))?")


def case_key(case):
    return [int(part) for part in case.split(".")]


def declared_size(description):
    """The largest message size a case's description states, or None."""
    sizes = [int(n) * (2 ** int(e) if e else 1) for n, e in SIZE.findall(description)]
    return max(sizes) if sizes else None


def load(index_path):
    with open(index_path) as f:
        index = json.load(f)
    missing = {"gatehouse", "direct"} - set(index)
    if missing:
        sys.exit(f"check: agents missing from {index_path}: {sorted(missing)}")
    reports = os.path.dirname(index_path)
    cases = {}
    for case, g in index["gatehouse"].items():
        d = index["direct"].get(case)
        if d is None:
            sys.exit(f"check: case {case} has no direct result")
        with open(os.path.join(reports, g["reportfile"])) as f:
            description = json.load(f)["description"]
        cases[case] = (g, d, description)
    return cases


def verdict(g, d, description, max_message):
    def fine(ours, theirs):
        return ours == "OK" or (ours in ACCEPTED_IF_SAME and ours == theirs)

    if fine(g["behavior"], d["behavior"]) and fine(g["behaviorClose"], d["behaviorClose"]):
        return "ok" if g["behavior"] == "OK" else "same as direct"
    size = declared_size(description)
    if size is not None and size > max_message and g["remoteCloseCode"] == 1009:
        return "over max_message_bytes, closed 1009"
    return None


def main():
    args = [a for a in sys.argv[1:] if a != "--update"]
    update = "--update" in sys.argv
    if len(args) != 3:
        sys.exit(__doc__)
    index_path, expected_path, max_message = args[0], args[1], int(args[2])
    cases = load(index_path)

    counts = {agent: Counter() for agent in ("gatehouse", "direct")}
    reasons = Counter()
    failures = []
    observed = {}
    for case in sorted(cases, key=case_key):
        g, d, description = cases[case]
        counts["gatehouse"][g["behavior"]] += 1
        counts["direct"][d["behavior"]] += 1
        observed[case] = {
            "behavior": g["behavior"],
            "close": g["behaviorClose"],
            "code": g["remoteCloseCode"],
        }
        why = verdict(g, d, description, max_message)
        if why is None:
            failures.append(
                f"  {case}: gateway {g['behavior']}/{g['behaviorClose']} "
                f"(close {g['remoteCloseCode']}), direct {d['behavior']}/{d['behaviorClose']}: "
                f"{description}"
            )
        else:
            reasons[why] += 1
            if why != "ok":
                print(f"  {case}: {why} ({g['behavior']}, close {g['remoteCloseCode']})")

    for agent, c in counts.items():
        print(f"{agent}: {sum(c.values())} cases, " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    print("by the pass rule: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))

    if update:
        with open(expected_path, "w") as f:
            json.dump(
                {"max_message_bytes": max_message, "cases": observed},
                f,
                indent=1,
                sort_keys=True,
            )
            f.write("\n")
        print(f"check: wrote {expected_path}")

    with open(expected_path) as f:
        expected = json.load(f)
    drift = []
    if expected.get("max_message_bytes") != max_message:
        drift.append(f"  max_message_bytes {max_message}, expected {expected.get('max_message_bytes')}")
    for case in sorted(set(expected["cases"]) | set(observed), key=case_key):
        want, got = expected["cases"].get(case), observed.get(case)
        if want != got:
            drift.append(f"  {case}: got {got}, expected {want}")

    if failures:
        print(f"FAIL: {len(failures)} case(s) break the pass rule:")
        print("\n".join(failures))
    if drift:
        print(f"FAIL: {len(drift)} difference(s) from {expected_path}:")
        print("\n".join(drift))
    if failures or drift:
        sys.exit(1)
    print(f"PASS: every case meets the pass rule and matches {os.path.basename(expected_path)}")


if __name__ == "__main__":
    main()
