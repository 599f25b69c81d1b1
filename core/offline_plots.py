"""`dvc plots show` without the internet: DVC's HTML page loads Vega, Vega-Lite and Vega-Embed from a CDN,
which no machine of an offline cluster reaches. This writes an HTML template for DVC (`plots.html_template`)
that carries the three libraries inline, bundled by vl-convert (the Vega project's own packaging).

    python -m core.offline_plots [.dvc/plots.html]     (make setup runs it)
"""
from __future__ import annotations

import sys
from pathlib import Path

VEGA_LITE = "5.20"  # DVC's templates are Vega-Lite v5 specs

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots</title>
    <script type="text/javascript">
BUNDLE
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def template() -> str:
    """DVC's page with `{plot_divs}` and `{refresh_tag}` and no `{scripts}` (the CDN tags DVC would put
    there), Vega-Embed, Vega-Lite and Vega inline instead (window.vegaEmbed, as DVC's plot divs call)."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE).replace("</script", "<\\/script")
    return PAGE.replace("BUNDLE", bundle)


def write_template(path: Path) -> Path:
    """Write the template atomically; DVC reads it through `plots.html_template` (relative to .dvc/)."""
    from core.data.shards import atomic_write_bytes

    atomic_write_bytes(path, template().encode())
    return path


if __name__ == "__main__":
    print(write_template(Path(sys.argv[1] if len(sys.argv) > 1 else ".dvc/plots.html")))
