"""The attention modules of ``attnzoo.modules``: parameter counts against the papers, and the
demonstrations on offline data, one script per group beside this one.

    python benchmarks/modules.py params     # every benchmarks/modules_params_*.py: module, config, params, paper's
    python benchmarks/modules.py demo       # every benchmarks/modules_demo_*.py (minutes on 2 CPU cores each)
    python benchmarks/modules.py demo --only cnn
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("params", "demo"))
    p.add_argument("--only", help="one group (the part of the script name after modules_<what>_)")
    args = p.parse_args()
    scripts = sorted(HERE.glob(f"modules_{args.what}_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem == f"modules_{args.what}_{args.only}"]
    if not scripts:
        raise SystemExit(f"no benchmarks/modules_{args.what}_{args.only or '*'}.py script")
    for script in scripts:
        print(f"== {script.name}", flush=True)
        sys.argv = [str(script)]  # each script parses its own (default) arguments
        runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
