"""Multi-node plan / confirm / apply: the one flow of the commands that work out what
they would change on every node, ask once, and then change at most that (``upgrade gc``,
``vmcore rm``; the node and rollout commands next).

One outcome: the planning errors and the applying errors are merged into one
:class:`katactl.fleet.FanOut` over every selected node, so a node that failed while
the plan was made is named in the result and counted by its ``exit_code()`` (some
failed, some succeeded: 4) instead of silently dropping out of it.
"""
from __future__ import annotations

from typing import Any, Callable

from katactl.fleet import FanOut, run_on_nodes


def plan_confirm_apply(settings, plan: Callable[[Any], Any], confirm: Callable[[dict[str, Any]], None],
                       apply: Callable[[Any, Any], Any], *,
                       needs_apply: Callable[[Any], bool] | None = None) -> FanOut:
    """1. ``plan(transport)`` on every selected node (changes nothing);
    2. ``confirm({node: plan})`` once, for the nodes whose plan succeeded (it may raise
       to stop everything; it decides itself whether there is anything to ask);
    3. ``apply(transport, plan)`` on those nodes (only where ``needs_apply(plan)``,
       when given).

    With one node selected, its planning error is raised (it *is* the command's
    error). Returns one FanOut over every selected node: the values of step 3, the
    errors of steps 1 and 3. A node whose plan needed nothing counts as succeeded.
    """
    planned_fo = run_on_nodes(settings, plan)
    planned_fo.raise_if_single_failure()
    planned = {n: planned_fo.values[n] for n in planned_fo.nodes if n in planned_fo.values}
    confirm(planned)
    todo = [n for n in planned if needs_apply is None or needs_apply(planned[n])]
    done = (run_on_nodes(settings, lambda t: apply(t, planned[t.node]), nodes=todo) if todo
            else FanOut(nodes=[], values={}, errors={}))
    return FanOut(nodes=planned_fo.nodes, values=done.values, errors={**planned_fo.errors, **done.errors},
                  selected=planned_fo.selected)
