"""How long a plan's stages take: measured pace, the longest chain, and the pipeline ETA.

Estimates start from priors for a 2-core CPU and follow the pace the training stages report
(their progress.json). The runner starts the stage heading the longest chain of remaining work
first, and its ETA replays that start order.
"""

from __future__ import annotations

from .plan import Stage

# prior seconds per iteration on a 2-core CPU, per stage kind, and fixed seconds per stage;
# replaced by the stages' measured pace as the pipeline runs (for the ETA and the start order)
PRIOR_SEC_PER_ITER = {"cls": 0.3, "det": 0.6}
PRIOR_SEC_FIXED = {"train": 15.0, "evaluate": 30.0, "export": 40.0,
                   "report": 30.0, "calibrate": 60.0, "weight_grid": 5.0, "select_weight": 5.0}
OTHER_SEC = 10.0  # a stage of a kind without a prior (a handler of the user's own)
# of a training stage's fixed seconds, those after its last iteration (evaluation, saving)
TRAIN_TAIL_SEC = PRIOR_SEC_FIXED["train"] / 2
HEAVY = ("train", "evaluate")  # the kinds --jobs limits (others are short, single-threaded)


class PlanClock:
    """Duration estimates for the stages of one plan.

    Args:
        stages: the plan.
        jobs: training stages run side by side (locally); ignored with `slurm`.
        slurm: every stage may run as soon as its inputs are done.
    """

    def __init__(self, stages: list, jobs: int, slurm: bool):
        self.stages, self.jobs, self.slurm = stages, jobs, slurm
        self._by_name = {s.name: s for s in stages}
        self._rate = dict(PRIOR_SEC_PER_ITER)

    def estimate(self, stage: Stage) -> float:
        """Seconds the whole stage is expected to take."""
        if stage.kind == "train":
            return stage.iters * self.sec_per_iter(stage) + PRIOR_SEC_FIXED["train"]
        return PRIOR_SEC_FIXED.get(stage.kind, OTHER_SEC)

    def observe_pace(self, stage: Stage, sec_per_iter: float) -> None:
        """Record a training stage's measured pace (its progress.json) for later estimates."""
        kind = stage.meta["stage"]
        self._rate[kind] = self._rate[kind, stage.meta.get("role")] = sec_per_iter

    def sec_per_iter(self, stage: Stage) -> float:
        """The latest pace measured on a stage of the same kind and role (a teacher's network
        is not a student's: one pace per kind put the students of a slow teacher behind the
        teacher detector in the start order), else on any stage of the kind, else the prior."""
        kind = stage.meta["stage"]
        return self._rate.get((kind, stage.meta.get("role")), self._rate[kind])

    def critical_path(self, stage: Stage, memo: dict) -> float:
        """Estimated seconds of the longest chain of stages from `stage` to the end."""
        if stage.name not in memo:
            later = [s for s in self.stages if stage.name in s.after]
            memo[stage.name] = self.estimate(stage) + max(
                (self.critical_path(s, memo) for s in later), default=0.0)
        return memo[stage.name]

    def eta(self, left: dict, finished: set) -> float:
        """Seconds until every stage in `left` (name -> seconds still needed) has run.

        A replay of how the stages will be started: each when the stages it reads are done,
        the longest chain first, locally at most `jobs` training stages at a time.
        """
        memo, now, running, waiting = {}, 0.0, {}, dict(left)
        done = set(finished)
        while waiting or running:
            ready = sorted((n for n in waiting if set(self._by_name[n].after) <= done),
                           key=lambda n: -self.critical_path(self._by_name[n], memo))
            for name in ready:
                heavy = sum(self._by_name[r].kind in HEAVY for r in running)
                if self._by_name[name].kind in HEAVY and not self.slurm and heavy >= self.jobs:
                    continue
                running[name] = now + waiting.pop(name)
            if not running:  # waits for a stage that failed: not part of this estimate
                break
            name = min(running, key=running.get)
            now = running.pop(name)
            done.add(name)
        return now
