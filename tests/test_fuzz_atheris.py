"""A short bounded run of the atheris (libFuzzer) harness ``scripts/fuzz_atheris.py`` per target
(issue 6): the public input validation, ``_native.load_config`` and ``_native.load_weights`` on
mutations of ``tests/fuzz_corpus`` (atheris is in the test extra; without it the script fails
and so does this test). Only the documented AutoGazeError subclasses may escape;
libFuzzer stops with a non-zero status and a ``crash-*`` file on anything else. The longer run
and its result are in docs/reliability.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_atheris.py"
# (runs, seconds) per target: a few seconds each on the shared 2-core CI box
BOUNDS = {"inputs": (3000, 3), "config": (3000, 3), "weights": (3000, 3)}


@pytest.mark.parametrize("target", sorted(BOUNDS))
def test_atheris_bounded_run_finds_nothing(target, tmp_path):
    runs, seconds = BOUNDS[target]
    r = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--target",
            target,
            f"-runs={runs}",
            f"-max_total_time={seconds}",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    log = r.stdout + r.stderr
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert r.returncode == 0 and not crashes, f"{target}: rc {r.returncode}, {crashes}\n{log[-4000:]}"
    assert "Done " in log, log[-2000:]
