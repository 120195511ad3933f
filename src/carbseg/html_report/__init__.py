"""The browsable HTML report of an evaluation or of pseudo-masks (``--html DIR``); see builder.py."""

from carbseg.html_report.builder import MARKER, HtmlReport, check_report_dir, image_hook

__all__ = ["MARKER", "HtmlReport", "check_report_dir", "image_hook"]
