"""Reports: picture grids (images.py), figures (plots.py) and the self-contained HTML page (html.py).

    from sculpt.report import write_report
    write_report(["runs/demo", "runs/esd/eval"], "report.html")
"""

from sculpt.report.html import ReportError, load_source, render_html, unique_labels, write_report

__all__ = ["ReportError", "load_source", "render_html", "unique_labels", "write_report"]
