"""Does a vLLM install resolve, and how fast? pip's dry run in fresh virtual environments, timed.

Two plans, each in its own new venv with pip upgraded first (nothing else is installed; pip only resolves):
- separate: `pip install --dry-run vllm==<V>` - the generation environment the README sets up for
  `RESP_VLLM_PYTHON` (resp sends it prompt token ids and gets token ids back). 0.33.0 is the newest
  vLLM that resolves from the package index (0.34.0 pins flashinfer-python==0.7.3, which it lacks).
- together: `pip install --dry-run -e <repo> vllm` - vLLM in resp's own environment. vLLM pins
  transformers below resp's range (0.33/0.34: < 5.21 / < 5.20; resp: >= 5.24, see pyproject.toml),
  so this cannot resolve; the run records how pip ends (a conflict, or still backtracking at --timeout).

Results: benchmarks/results/vllm_resolve.json (or --out): per plan, the command, the wall time, pip's
exit status, whether it resolved, the versions it would install (torch, transformers, vllm) or the
last lines pip printed. Needs the package index; not part of the tests.

    python benchmarks/vllm_resolve.py                 # about 4 minutes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry_run(requirements: list[str], timeout: float) -> dict:
    """pip's dry-run resolution of `requirements` in a fresh venv: seconds, exit status, plan or tail."""
    with tempfile.TemporaryDirectory(prefix="vllm-resolve-") as tmp:
        venv.create(tmp, with_pip=True)
        python = str(Path(tmp) / "bin" / "python")
        # the pip a venv bundles can be years old (3.11.7: pip 23.2, which took over 180 s for vLLM alone)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True, capture_output=True)
        pip_version = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True).stdout.split()[1]
        report = Path(tmp) / "report.json"
        command = [python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), *requirements]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            status, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:
            status = None
            output = (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace")
        seconds = time.perf_counter() - start
        result = {"command": "pip install --dry-run " + " ".join(requirements), "pip": pip_version, "seconds": round(seconds, 1),
                  "exit_status": status, "resolved": status == 0}
        if status == 0:
            plan = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                    for item in json.loads(report.read_text())["install"]}
            result["would_install"] = {name: plan.get(name) for name in ("torch", "transformers", "vllm")}
            result["packages"] = len(plan)
        else:
            lines = [line for line in output.splitlines() if line.strip() and "is ignored" not in line]
            result["last_lines"] = lines[-12:] if status is not None else \
                [f"still resolving after {timeout:.0f} s"] + lines[-6:]
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm", default="0.33.0", help="vLLM version of the separate environment")
    parser.add_argument("--timeout", type=float, default=180, help="seconds before a plan counts as unresolved")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vllm_resolve.json")
    args = parser.parse_args()
    results = {"python": sys.version.split()[0], "limit_s": args.timeout, "plans": {}}
    for name, requirements in (("separate", [f"vllm=={args.vllm}"]),
                               ("together", ["-e", str(ROOT), "vllm"])):
        print(f"{name}: pip install --dry-run {' '.join(requirements)} ...", flush=True)
        results["plans"][name] = outcome = dry_run(requirements, args.timeout)
        print(f"  {'resolved' if outcome['resolved'] else 'did not resolve'} in {outcome['seconds']} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
