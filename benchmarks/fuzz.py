"""The long hostile-input run: 10,000+ hypothesis examples against the real handler.

    python scripts/fuzz.py                     # 10,000 examples
    python scripts/fuzz.py --examples 50000 --seed 7

The handler is built as the runtime builds it, under the tight limits of
``benchmarks/hostile_input.py`` (``TIGHT_ENV``), and every example is judged by the oracle
there, the property tests' own: a valid image within the limits, or a ``ValueError`` naming
the field, raised before any model ran and within a fraction of a second. A failing example
is recorded and the run goes on; the exit status is 1 if there was any. It prints the count,
the outcomes, the failures and the slowest rejection.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import Counter

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from benchmarks.hostile_input import (
    FIELDS,
    Prober,
    bodies,
    json_values,
    load_tight_handler,
    one_field_body,
)


def examples(limits) -> st.SearchStrategy:
    """The three property tests' inputs, mixed: whole bodies, one hostile field in a valid
    request, and bodies that are not objects."""
    return st.one_of(
        bodies(limits),
        bodies(limits),
        bodies(limits),
        st.builds(one_field_body, st.sampled_from(FIELDS), json_values, st.booleans()),
        json_values.filter(lambda v: not isinstance(v, dict)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=10_000, help="how many (10,000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (0)")
    parser.add_argument("--max-seconds", type=float, default=3600, help="stop after (3600)")
    args = parser.parse_args(argv)

    prober = Prober(load_tight_handler())
    outcomes: Counter[str] = Counter()
    failures: list[tuple[str, str]] = []
    slowest = (0.0, "", "")
    generation_seconds = 0.0
    started = time.monotonic()

    @seed(args.seed)
    @settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        derandomize=False,
        phases=[Phase.generate],  # no shrinking: failures are recorded, and the run goes on
        suppress_health_check=list(HealthCheck),
    )
    @given(body=examples(prober.limits))
    def run(body):
        nonlocal slowest, generation_seconds
        if time.monotonic() - started > args.max_seconds:
            return
        try:
            outcome = prober.check(body)
        except Exception as exc:  # noqa: BLE001  every failure is a finding to report
            outcomes["failure"] += 1
            failures.append((repr(body)[:300], "".join(traceback.format_exception_only(exc))))
            return
        outcomes[outcome.kind] += 1
        if outcome.kind == "rejected" and outcome.seconds > slowest[0]:
            slowest = (outcome.seconds, repr(body)[:200], outcome.message[:200])
        if outcome.kind == "image":
            generation_seconds += outcome.seconds
        done = sum(outcomes.values())
        if done % 1000 == 0:
            print(f"... {done:,} examples, {time.monotonic() - started:.0f} s", file=sys.stderr)

    run()
    total = sum(outcomes.values())
    seconds = time.monotonic() - started
    print(f"examples run        {total:,} (hypothesis seed {args.seed})")
    print(f"  valid: images     {outcomes['image']:,}")
    print(f"  rejected (400)    {outcomes['rejected']:,}")
    print(f"  failures          {outcomes['failure']:,}")
    print(f"slowest rejection   {slowest[0] * 1000:.1f} ms: {slowest[1]}")
    print(f"                    -> {slowest[2]}")
    if outcomes["image"]:
        print(f"mean generation     {generation_seconds / outcomes['image'] * 1000:.1f} ms")
    print(f"wall time           {seconds:.0f} s")
    for body, error in failures[:50]:
        print(f"FAILURE {body}\n  {error.strip()}")
    if total < args.examples:
        print(f"stopped at the {args.max_seconds:g} s limit before {args.examples:,} examples")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
