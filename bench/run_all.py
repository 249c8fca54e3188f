"""`make bench`: every CPU benchmark in turn, each against its plain baseline, into one Markdown file.

Each script runs in its own process (a fresh Ray per benchmark) and writes its own table; this
collects them. The GPU benchmark (bench_gpu.py, and the --device cuda modes) is run by hand on
a GPU machine. The predict benchmark scores with the demo pipeline (run `make demo` first). On
this 2-core machine with nothing else running: training on 27,000 posts (epochs of >= 30 s, the
issue's condition) about 12 minutes, extraction 3, tune about 10, the scale benchmark over the
issue's range (3k, 10k, 30k posts) about 7; several times that on cores shared with other work.
Pass --quick for a smoke run that only checks the scripts work.

The ablation (bench/ablation.py, every variant x 3 seeds, ~25 minutes) is run by hand; here its
table is only re-rendered from the numbers of that run (bench/out/ablation.json), and --quick
runs two variants for one seed into a separate cache, leaving those numbers alone.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = {
    "train": ["bench_train.py", "--posts", "27000", "--epochs", "2"],
    "extract": ["bench_extract.py", "--posts", "1024"],
    "tune": ["bench_tune.py", "--trial-seconds", "30", "--trials", "4"],
    "predict": ["bench_predict.py", "--pipeline", "runs/demo"],  # after `make demo`
    "scale": ["bench_scale.py", "--posts", "3000,10000,30000"],
    "ablation": ["ablation.py", "--render-only"],  # after `bench/ablation.py --seeds 3`
}
QUICK = {
    "train": ["bench_train.py", "--posts", "600", "--epochs", "2"],
    "extract": ["bench_extract.py", "--posts", "256"],
    "tune": ["bench_tune.py", "--quick"],
    "predict": ["bench_predict.py", "--pipeline", "runs/demo", "--small", "8", "--large", "200",
                "--serve-requests", "20"],
    "scale": ["bench_scale.py", "--posts", "360,720", "--rounds", "20",
              "--workdir", str(HERE / "out" / "scale-quick")],
    "ablation": ["ablation.py", "--seeds", "1", "--variants", "full,fusion_off", "--posts", "600", "--epochs", "1",
                 "--work", str(HERE / "out" / "ablation_quick"), "--json", str(HERE / "out" / "ablation_quick.json")],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(HERE / "results.md"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated: train,extract,tune,predict,scale,ablation")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    chosen = [n for n in plan if not args.only or n in args.only.split(",")]
    sections = [f"# smpp_ray benchmarks\n\n{datetime.date.today()} on {platform.node()} "
                f"({platform.machine()}, Python {platform.python_version()}); ratios are against a plain "
                "baseline run in the same script.\n"]
    failed = []
    for name in chosen:
        part = HERE / "out" / f"{name}.md"
        part.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(HERE / plan[name][0]), *plan[name][1:], "--out", str(part)]
        print("running", " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0 or not part.is_file():
            failed.append(name)
            continue
        sections.append(part.read_text())
    Path(args.out).write_text("\n\n".join(sections) + "\n")
    print(f"wrote {args.out}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
