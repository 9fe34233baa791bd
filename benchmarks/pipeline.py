"""Time the spine from a fresh clone: `saeclt run` on each spec, stage by stage, with the
figures the issue asks for (subject tour lengths, FVU vs linear, L0, patched tour lengths).

    python benchmarks/pipeline.py [SPEC ...]     # default: specs/clt_L0_L2.yaml specs/sae_L2.yaml

Clones the current commit into a temporary folder (nothing cached, nothing trained), so the
first spec pays for subject training and collection and later ones reuse them. Then reruns
the first spec with nothing changed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(spec: str, cwd: Path) -> tuple[float, list[str]]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sae_clt", "run", spec], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        sys.exit(f"saeclt run {spec} failed:\n{proc.stderr[-3000:]}")
    ran = re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr)
    return seconds, ran


def main() -> None:
    specs = sys.argv[1:] or ["specs/clt_L0_L2.yaml", "specs/sae_L2.yaml"]
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        for spec in specs:
            seconds, ran = run(spec, clone)
            print(f"saeclt run {spec}: {seconds:.0f} s from this state; stages run: {', '.join(ran)}")
        seconds, ran = run(specs[0], clone)
        print(f"saeclt run {specs[0]} again, nothing changed: {seconds:.1f} s; stages run: {ran or 'none'}")

        subject = json.loads(next((clone / "metrics" / "subjects").glob("*.json")).read_text())
        print("subject mean tour lengths:", {k: round(v, 4) for k, v in subject["mean_tour_length"].items()})
        for spec in specs:
            eid = Path(spec).stem
            m = json.loads((clone / "metrics" / eid / "eval.json").read_text())
            line = (f"{eid}: FVU {m['reconstruction']['fvu']:.4f}, linear baseline FVU {m['linear_baseline']['fvu']:.4f} "
                    f"({m['fvu_vs_linear_pct']:+.1f} %), L0 {m['sparsity']['l0']:.1f}, dead {m['sparsity']['dead_fraction']:.3f}")
            causal = m.get("causal", {}).get("mean_tour_length")
            if causal:
                pct = causal["pct_change_vs_clean"]
                line += (f"; tour clean {causal['values']['clean']:.4f}, patched {pct['dictionary']:+.2f} %, "
                         f"linear {pct['linear_baseline']:+.2f} %, zero-ablated {pct['zero_ablation']:+.1f} %")
            print(line)
            committed = REPO / "metrics" / eid / "eval.json"
            if committed.exists():
                same = committed.read_bytes() == (clone / "metrics" / eid / "eval.json").read_bytes()
                print(f"  metrics identical to the committed ones: {same}")


if __name__ == "__main__":
    main()
