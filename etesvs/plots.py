"""The page `dvc plots show` writes, made to draw offline.

DVC's default page loads Vega, Vega-Lite and vega-embed from a CDN, so on a machine without network every chart
stays blank. ``python -m etesvs.plots`` writes an HTML template with the three libraries inlined, taken from the
``vl-convert-python`` package (which bundles them), and the repository's DVC config points
``plots.html_template`` at it (``.dvc/plots_page.html``). ``make`` writes it when it installs the project.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from etesvs.errors import EtesvsError, run_main
from etesvs.io import atomic_path

DEFAULT_PAGE = Path(".dvc") / "plots_page.html"

_PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>ETESVS plots</title>
    <!-- Vega {vega}, Vega-Lite {vegalite}, vega-embed {embed}, inlined from vl-convert-python: no network needed. -->
    <script>
{bundle}
    </script>
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def page_template() -> str:
    """The HTML template: DVC's placeholders ``{refresh_tag}`` and ``{plot_divs}``, the libraries inline.

    DVC's ``{scripts}`` placeholder (its CDN script tags) is deliberately absent.
    """
    try:
        import vl_convert
    except ImportError:
        raise EtesvsError("vl-convert-python is not installed (pip install -r requirements.txt)") from None
    versions = {"{vega}": vl_convert.get_vega_version(), "{vegalite}": vl_convert.get_vegalite_versions()[-1],
                "{embed}": vl_convert.get_vega_embed_version()}
    page = _PAGE
    for placeholder, value in versions.items():
        page = page.replace(placeholder, value)
    return page.replace("{bundle}", vl_convert.javascript_bundle())  # last: the bundle is not searched


def write_page_template(path: str | Path = DEFAULT_PAGE) -> Path:
    """Write :func:`page_template` to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(page_template(), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PAGE, help="where DVC's plots.html_template points")
    args = parser.parse_args(argv)
    print(f"wrote {write_page_template(args.out)}")


if __name__ == "__main__":
    run_main(main)
