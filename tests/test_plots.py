"""Charts that draw offline: the page template with the libraries inlined, and the custom Vega-Lite templates."""

from __future__ import annotations

import configparser
import json
import re

import pytest

from etesvs.plots import page_template
from tests.conftest import ROOT


def test_page_template_inlines_vega_and_loads_nothing_from_the_network():
    page = page_template()
    assert page.count("{plot_divs}") == 1 and page.count("{refresh_tag}") == 1
    assert "{scripts}" not in page, "DVC's CDN script tags must not be inserted"
    assert not re.search(r"<script[^>]+src=", page) and "cdn.jsdelivr" not in page
    assert "window.vegaEmbed=" in page and page.count("</script>") == 1
    assert len(page) > 500_000, "Vega, Vega-Lite and vega-embed are inline"


def test_dvc_config_points_plots_at_the_generated_page():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    assert config["plots"]["html_template"] == "plots_page.html"
    assert "python -m etesvs.plots" in (ROOT / "Makefile").read_text()
    assert "/.dvc/plots_page.html" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("name", ["by_model", "confusion_counts"])
def test_custom_templates_are_vega_lite_with_dvc_anchors(name):
    text = (ROOT / ".dvc" / "plots" / f"{name}.json").read_text()
    assert '"<DVC_METRIC_DATA>"' in text
    spec = json.loads(text)
    assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/")


def test_by_model_colours_each_model_and_uses_integer_epochs():
    import vl_convert

    spec = json.loads((ROOT / ".dvc" / "plots" / "by_model.json").read_text()
                      .replace("<DVC_METRIC_X_LABEL>", "epoch").replace("<DVC_METRIC_Y_LABEL>", "acc")
                      .replace("<DVC_METRIC_X>", "epoch").replace("<DVC_METRIC_Y>", "val_acc")
                      .replace("<DVC_METRIC_TITLE>", "t"))
    spec["data"]["values"] = [{"epoch": str(e), "val_acc": str(10 * e + m), "rev": "workspace",
                               "filename": f"{name}/train/curves.csv"}
                              for m, name in enumerate(["mstcn", "etesvs"]) for e in (1, 2, 3)]
    svg = vl_convert.vegalite_to_svg(spec)
    legend = re.findall(r">(mstcn|etesvs)<", svg)
    assert sorted(set(legend)) == ["etesvs", "mstcn"], "one legend entry (colour) per model"
    ticks = re.findall(r'aria-label="X-axis[^"]*"', svg)
    assert ticks and "values from 1 to 3" in ticks[0]
    labels = re.findall(r'<text[^>]*>([0-9.]+)</text>', svg.split("X-axis")[1].split("Y-axis")[0])
    assert labels == ["1", "2", "3"], labels
