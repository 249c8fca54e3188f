"""One self-contained HTML report of a finished pipeline: :func:`write_report`.

One module per part: :mod:`.facts` (date, commit, backbone, config, resources, MLflow runs),
:mod:`.leaderboard` (metrics with bootstrap intervals), :mod:`.plots` (figures), :mod:`.posts`
(worst-predicted posts), :mod:`.network` (classification heads), :mod:`.data_summary`, and
:mod:`.page`, which puts them together; :mod:`.markup` holds the HTML pieces.
"""

from smpp_ray.report.page import SECTIONS, write_report

__all__ = ["SECTIONS", "write_report"]
