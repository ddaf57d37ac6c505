"""Top-k accuracy of a classifier, in detectron2's DatasetEvaluator form (distributed-safe)."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["ClassificationEvaluator"]


_NEVER = 2**62  # the rank of an image with non-finite logits: outside every top-k


class ClassificationEvaluator(DatasetEvaluator):
    """Single-crop top-k accuracy (%) over a dataset.

    Inputs are dataset dicts with "label"; outputs are model outputs with "logits"
    ([num_classes]). An image counts as top-k correct when fewer than k other classes score at
    least as high as its label: a tie counts against it, so constant logits (a collapsed head)
    score 0, not 100%, and logits that are not all finite never count. With several processes,
    every rank's results are gathered on rank 0, which returns `{"classification": {"top1": ...,
    "top5": ..., "num_images": ...}}`; other ranks return {}.
    """

    def __init__(self, dataset_name: str | None = None, topk=(1, 5), distributed: bool = True):
        """
        Args:
            dataset_name: used in log messages only.
            topk: the k values reported, e.g. (1, 5).
            distributed: gather results from all processes (no-op with one process).
        """
        self.dataset_name = dataset_name
        self.topk = tuple(int(k) for k in topk)
        self.distributed = distributed
        self._ranks: list[int] = []

    def reset(self):
        self._ranks = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            logits = out["logits"].detach().float()
            label = int(inp["label"])
            if not bool(torch.isfinite(logits).all()):  # NaN compares False: it would rank 0
                self._ranks.append(_NEVER)
                continue
            self._ranks.append(int((logits >= logits[label]).sum()) - 1)  # ties count against

    def evaluate(self):
        ranks = self._ranks
        if self.distributed:
            comm.synchronize()
            ranks = list(itertools.chain(*comm.gather(ranks, dst=0)))
            if not comm.is_main_process():
                return {}
        if not ranks:
            raise RuntimeError(f"ClassificationEvaluator({self.dataset_name}) saw no images")
        r = torch.tensor(ranks)
        res = {f"top{k}": 100.0 * (r < k).float().mean().item() for k in self.topk}
        res["num_images"] = len(ranks)
        return OrderedDict(classification=res)
