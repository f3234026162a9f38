"""Write params.yaml from conf/ exactly as `dvc exp run` does (DVC's own Hydra composition).

Not a DVC stage: run it after editing conf/ so that plain `dvc repro` sees the same values,
`python stages/compose_params.py [OVERRIDE ...] [--out params.yaml]`, e.g. `dataset=gtea`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compose(out: Path, overrides: list[str]) -> None:
    """Compose ``conf/config.yaml`` with Hydra ``overrides`` and dump it to ``out``."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(ROOT), overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides such as dataset=gtea or window=120")
    parser.add_argument("--out", type=Path, default=ROOT / "params.yaml")
    args = parser.parse_args()
    compose(args.out, args.overrides)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
