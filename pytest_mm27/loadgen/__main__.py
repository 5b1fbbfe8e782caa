"""python -m pytest_mm27.loadgen --endpoint URL --model NAME --workload quick --concurrency 1,4,8"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..parsing import parse_concurrency, parse_positive_float, parse_positive_int
from ..errors import Mm27Error
from ..catalog.paths import catalog_dirs
from ..catalog.workload import load_workloads, parse_workload
from . import run_level


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_mm27.loadgen",
                                 description="Closed-loop streaming load against OpenAI-API servers.")
    ap.add_argument("--endpoint", action="append", required=True,
                    help="server base URL (repeat for several; requests go to the least busy)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", default="quick", help="catalog name or path to a workload .toml")
    ap.add_argument("--concurrency", type=parse_concurrency, default=(1,),
                    help="comma-separated levels, e.g. 1,4,8")
    ap.add_argument("--workers", type=parse_positive_int, default=None, help="client processes per level (default: auto)")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                    help="Bearer token (default: $OPENAI_API_KEY)")
    ap.add_argument("--level-timeout", type=parse_positive_float, default=None, help="seconds per level")
    ap.add_argument("--json", action="store_true", help="print one JSON object per level")
    args = ap.parse_args(argv)

    try:
        if args.workload.endswith(".toml") or os.sep in args.workload:
            workload = parse_workload(Path(args.workload))
        else:
            workload = load_workloads(catalog_dirs("workloads")).get(args.workload)
        for c in args.concurrency:
            m = run_level(args.endpoint, args.model, workload, c, api_key=args.api_key,
                          workers=args.workers, level_timeout_s=args.level_timeout)
            print(json.dumps(m.to_dict()) if args.json else m.summary(), flush=True)
    except Mm27Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
