"""Parameters: conf/ -> params.yaml -> the stage, and nowhere else.

``python -m etesvs.params [OVERRIDE ...] [--out params.yaml]`` composes ``conf/config.yaml`` with Hydra exactly as
``dvc exp run -S ...`` does (DVC's own composition), e.g. ``python -m etesvs.params experiment=tiny``.

A stage reads its numbers with :func:`stage_params`, which returns exactly the params that the stage's entry in
dvc.yaml declares, nothing more: DVC tracks what the stage reads by construction. A section becomes keyword
arguments with :func:`call_with`, which refuses unknown or missing keys in one line naming the section.

Hydra stays at this edge: only the composition command imports it (through DVC), the library never does.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from etesvs.errors import EtesvsError, run_main
from etesvs.io import read_yaml

PARAMS_FILE = "params.yaml"
DVC_FILE = "dvc.yaml"
_ITEM = re.compile(r"\$\{item\.([A-Za-z0-9_]+)\}")


def _stage_entry(stages: Mapping[str, Any], address: str, dvc_file: Path) -> tuple[dict, dict[str, Any]]:
    """The dvc.yaml entry of stage ``address`` (``name`` or ``name@item`` of a matrix) and its matrix item."""
    name, _, suffix = address.partition("@")
    entry = stages.get(name)
    if not isinstance(entry, dict):
        raise EtesvsError(f"{dvc_file}: no stage '{name}'")
    matrix = entry.get("matrix")
    if not suffix:
        if matrix:
            raise EtesvsError(f"{dvc_file}: stage '{name}' is a matrix; name one of its items ({name}@...)")
        return entry, {}
    if not isinstance(matrix, dict):
        raise EtesvsError(f"{dvc_file}: stage '{name}' has no matrix, so '{address}' names nothing")
    keys = list(matrix)
    for values in itertools.product(*(matrix[key] for key in keys)):
        if "-".join(str(value) for value in values) == suffix:  # DVC's name for a matrix item
            return entry, dict(zip(keys, values))
    raise EtesvsError(f"{dvc_file}: stage '{name}' has no matrix item '{suffix}'")


def _lookup(params: Mapping[str, Any], key: str, params_file: Path) -> Any:
    value: Any = params
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise EtesvsError(f"{params_file}: no parameter '{key}' (compose it with `python -m etesvs.params`)")
        value = value[part]
    return value


def _insert(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def stage_params(
    default_stage: str, *, dvc_file: str | os.PathLike = DVC_FILE, params_file: str | os.PathLike = PARAMS_FILE
) -> dict[str, Any]:
    """The params of ``params_file`` that the running stage declares in ``dvc_file``, as a nested dict.

    The stage is ``$DVC_STAGE``, which DVC sets for every command it runs (``train_temporal@mstcn`` for an item
    of a matrix stage), or ``default_stage`` when the script is run by hand. A declared key may be a whole section
    (``streaming``) or a dotted path (``dataset.sample_rate``); ``${item.<key>}`` in the declarations is the
    matrix item's value. Anything not declared is absent from the result, so reading it fails instead of silently
    escaping DVC's tracking.
    """
    stage = os.environ.get("DVC_STAGE") or default_stage
    dvc_file, params_file = Path(dvc_file), Path(params_file)
    stage = stage.rpartition(":")[2]  # DVC addresses stages of a dvc.yaml elsewhere as path/dvc.yaml:name
    stages = (read_yaml(dvc_file) or {}).get("stages") or {}
    entry, item = _stage_entry(stages, stage, dvc_file)
    params = read_yaml(params_file) or {}
    selected: dict[str, Any] = {}
    for declared in entry.get("params") or []:
        if not isinstance(declared, str):
            raise EtesvsError(f"{dvc_file}: stage '{stage}' declares params of another file ({declared}); "
                              f"only {PARAMS_FILE} keys are read")
        key = _ITEM.sub(lambda match: str(item[match.group(1)]), declared)
        _insert(selected, key, _lookup(params, key, params_file))
    return selected


def check_section(function: Callable[..., Any], section: Mapping[str, Any], *, where: str,
                  fixed: Iterable[str] = ()) -> None:
    """Refuse, in one line, keys of ``section`` that ``function`` does not take, keys it needs that are missing
    (the argument names in ``fixed`` come from elsewhere) and keys that clash with ``fixed``."""
    fixed = set(fixed)
    signature = inspect.signature(function)
    accepted = {name for name, p in signature.parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    unknown = sorted(set(section) - accepted) if not takes_any else []
    if unknown:
        known = ", ".join(sorted(accepted - fixed)) or "none"
        raise EtesvsError(f"{where}: unknown key {', '.join(unknown)} (known keys: {known})")
    clash = sorted(set(section) & fixed)
    if clash:
        raise EtesvsError(f"{where}: {', '.join(clash)} is set from the data and cannot be configured")
    missing = [
        name for name, p in signature.parameters.items()
        if p.default is p.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        and name not in section and name not in fixed and name != "self"
    ]  # fmt: skip
    if missing:
        raise EtesvsError(f"{where}: missing key {', '.join(missing)}")


def call_with(function: Callable[..., Any], section: Mapping[str, Any] | None, *, where: str, **fixed: Any) -> Any:
    """``function(**fixed, **section)``, with unknown or missing keys of ``section`` refused in one line.

    ``where`` names the section for the message, e.g. ``"params.yaml: mstcn.model"``. ``fixed`` are the
    arguments that come from the data rather than the configuration (``num_classes``, ``in_channels``).
    """
    section = dict(section or {})
    check_section(function, section, where=where, fixed=fixed)
    try:
        return function(**fixed, **section)
    except (TypeError, ValueError) as error:
        raise EtesvsError(f"{where}: {' '.join(str(error).split())}") from None


def project_root() -> Path:
    """The directory holding conf/ and dvc.yaml: ``$DVC_ROOT`` under DVC, else the current directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())


def compose(overrides: list[str], *, out: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
    """Compose ``<root>/conf/config.yaml`` with Hydra ``overrides`` (as ``dvc exp run -S`` does) into ``out``."""
    from dvc.utils.hydra import compose_and_dump  # Hydra only at this edge
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    root = Path(root) if root is not None else project_root()
    if not (root / "conf" / "config.yaml").is_file():
        raise EtesvsError(f"{root / 'conf' / 'config.yaml'}: not found (run from the project root)")
    try:
        compose_and_dump(Path(out), str(root / "conf"), None, "config", str(root), overrides)
    except (HydraException, OmegaConfBaseException) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EtesvsError(f"{root / 'conf'}: cannot compose with {' '.join(overrides) or 'no overrides'}: "
                          f"{first}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides such as dataset=gtea, window=120, experiment=tiny")
    parser.add_argument("--out", type=Path, default=Path(PARAMS_FILE))
    args = parser.parse_args(argv)
    compose(args.overrides, out=args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
