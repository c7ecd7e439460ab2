"""The paper jobs of the DAG: what the render, overlay, check and report rules read and write.
A part of ``workflow.Plan`` (its base class), kept apart by concept; it reads the Plan's items,
controls and paths. The report reads only these declared outputs.
"""
from __future__ import annotations

from typing import Any, Mapping

from webssl_repro.paper import specs

REPORT_NAME = "report.md"
CHECK_FILES = ("claims.tsv", "claims.md", "comparison.tsv")


class PaperJobs:
    """Paper-job methods of ``workflow.Plan``."""

    config: Mapping[str, Any]

    def check_outputs(self) -> list[str]:
        return [f"{self.paper_dir}/check/{name}" for name in CHECK_FILES]

    def check_inputs(self) -> list[str]:
        """What the claims read: every requested item's inputs (eval JSONs, or the published TSVs),
        the VQA probe's controls where the scale runs them, and the classic tasks' answers without the image."""
        items = dict.fromkeys(p for item in self.items for p in self.item_inputs(item))
        if self.published:
            return list(items)
        controls = [self.control_path(c) for c in self.vqa_controls()] + self.no_image_answers()
        return list(dict.fromkeys([*items, *controls]))

    @staticmethod
    def published_tsvs() -> list[str]:
        """The published numbers the comparison reads at every scale."""
        from webssl_repro.paper.published import RESULT_FILES
        from webssl_repro.workflow import PUBLISHED_DIR

        return [f"{PUBLISHED_DIR}/{file}" for file in RESULT_FILES]

    @staticmethod
    def published_inputs(item_id: str) -> list[str]:
        """The published TSVs an item is rendered from at the published scale, or beside a run scale's."""
        from webssl_repro.workflow import published_files

        return published_files(specs.get_item(item_id))

    def reference_outputs(self, item_id: str) -> list[str]:
        """The item rendered from the paper's numbers inside a run scale's folder (``paper/{scale}/published/``)."""
        item = specs.get_item(item_id)
        if item.kind == "table":
            return [f"{self.paper_dir}/published/tables/{item_id}.{ext}" for ext in ("tsv", "md", "tex")]
        return [f"{self.paper_dir}/published/figures/{item_id}.{ext}" for ext in ("pdf", "png")]

    def overlay_output(self, item_id: str) -> str:
        return f"{self.paper_dir}/figures/{item_id}_vs_published.png"

    def report_output(self) -> str:
        return f"{self.paper_dir}/{REPORT_NAME}"

    def report_inputs(self) -> list[str]:
        paths = [p for item in self.items for p in self.item_outputs(item)] + self.data_figures()
        paths += self.check_outputs()
        if not self.published:
            for item in self.items:
                paths += self.reference_outputs(item)
                if specs.get_item(item).overlay:
                    paths.append(self.overlay_output(item))
        return paths
