"""The soak's small version (the full one: tests/bench/soak.py)."""

from __future__ import annotations

import random
from pathlib import Path

from bench.soak import soak

#: tapd's RSS may grow this much after the warm-up (measured: +0.4 to +1.3 MiB
#: over 5,000 requests; a leak of one reply buffer per request would be more)
RSS_BOUND_MIB = 4.0


def test_thousands_of_requests_leak_nothing(tmp_path: Path) -> None:
    seed = random.randrange(1 << 32)
    print(f"soak seed {seed}")
    report = soak(requests=3000, clients=16, workdir=tmp_path, seed=seed)
    print(report.outcomes, report.seconds, "s")
    assert report.unexpected == [], f"seed {seed}"
    assert set(report.outcomes) == {"request", "hold", "malformed", "refused", "vanish"}
    assert report.final_fds == report.baseline_fds
    assert report.rss_growth_mib <= RSS_BOUND_MIB, report.samples
