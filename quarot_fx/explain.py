"""``quarot_fx.explain``: what the backend would do to a model, without keeping anything compiled."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from .config import QuaRotConfig
from .report import Report, collect_reports


@dataclass
class Explanation:
    """The reports of every graph Dynamo produced for one call (more than one after a graph break)."""

    reports: list[Report]

    def region_counts(self) -> dict[str, int]:
        total = Counter()
        for report in self.reports:
            total.update(report.region_counts())
        return dict(sorted(total.items()))

    @property
    def skipped(self):
        return [s for r in self.reports for s in r.skipped]

    def __str__(self) -> str:
        head = f"{len(self.reports)} graph(s); regions {self.region_counts()}"
        return "\n\n".join([head, *map(str, self.reports)])


def explain(model: torch.nn.Module, *args, model_kwargs: dict | None = None, **options) -> Explanation:
    """Run ``model(*args, **model_kwargs)`` once through the quarot backend and return its reports.

    Takes the same options as the backend; lowering defaults to ``"fx"`` (no Inductor
    compile) since only the analysis is wanted.
    """
    options.setdefault("lowering", "fx")
    config = QuaRotConfig.from_options(options)
    compiled = torch.compile(model, backend="quarot", options=config.to_options())
    with torch.no_grad(), collect_reports() as reports:
        compiled(*args, **(model_kwargs or {}))
    return Explanation(list(reports))
