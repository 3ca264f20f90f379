"""Zero Bubble's split backward on stock autograd: I takes only the input gradient, W only the
weight gradients, and I + W costs one backward, not two.

Autograd computes only what a call asks for: a node on the way to the stage input computes the
gradient of its input argument and skips its weight argument (a matmul does one of its two
products). So I is one `autograd.grad` towards the stage input and, captured on the way, the
gradient of every *junction*, the node where a parameter's branch leaves the input's path (the
matmul of a Linear, the LayerNorm). W then starts autograd at the junctions, with those
gradients, towards the parameters of each group (parameters that share a junction, like a
Linear's weight and bias): each junction now computes only its weight products, and nothing on
the input's path runs twice. This is the graph walk of torch.distributed.pipelining's
`stage_backward_input` / `stage_backward_weight`, and what the Zero Bubble paper (Qi et al., 2024)
does with per-layer weight-gradient stores; here it needs no change to the model.

One call per group is exact only if no junction of a group lies upstream of another junction of
the same group on the input's path (a parameter used twice in a row), or the later junction's
gradient would arrive twice. `plan` checks it and returns None for such a graph, and for one whose
output does not depend on its input (stage 0); the stage then runs the whole backward in W.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.autograd.graph import GradientEdge, Node


@dataclass
class WeightPass:
    """What W needs after I: per group of parameters, the junction outputs its branches hang from,
    and (once I ran) the gradient each of those outputs received."""

    groups: list[tuple[list[torch.Tensor], list[GradientEdge]]]
    received: dict[GradientEdge, torch.Tensor] = field(default_factory=dict)

    def run(self) -> None:
        """W: the weight gradients, accumulated into each parameter's `.grad` as a backward would."""
        for params, edges in self.groups:
            pairs = [(edge, grad) for edge in edges if (grad := self.received.pop(edge, None)) is not None]
            if pairs:
                torch.autograd.backward([edge for edge, _ in pairs], [grad for _, grad in pairs], inputs=params)


def plan(output: torch.Tensor, inputs: torch.Tensor, params: Sequence[torch.Tensor]) -> WeightPass | None:
    """The junctions of `output`'s graph between the input's path and each parameter, grouped;
    None where one call per group would not be exact (see the module docstring)."""
    if output.grad_fn is None or not inputs.requires_grad:
        return None
    parents: dict[Node, list[Node]] = defaultdict(list)
    used: dict[Node, set[int]] = defaultdict(set)  # node -> its outputs that have a gradient to receive
    used[output.grad_fn].add(output.output_nr)
    leaves: dict[int, Node] = {}  # id(tensor) -> its AccumulateGrad node, for the leaves of this graph
    seen = {output.grad_fn}
    queue = [output.grad_fn]
    while queue:
        node = queue.pop()
        for child, nr in node.next_functions:
            if child is not None:
                parents[child].append(node)
                used[child].add(nr)
                if child not in seen:
                    seen.add(child)
                    queue.append(child)
                    variable = getattr(child, "variable", None)  # set on AccumulateGrad nodes only
                    if variable is not None:
                        leaves[id(variable)] = child
    source = leaves.get(id(inputs))
    if source is None:
        return None
    on_path = _upstream([source], parents, lambda node: True)  # nodes whose gradient reaches the input
    group_of: dict[Node, int] = {}  # junction -> group
    groups: list[tuple[list[torch.Tensor], set[Node]]] = []
    for param in params:
        leaf = leaves.get(id(param))
        if leaf is None:
            continue  # not used by this forward
        junctions = {parent for node in _upstream([leaf], parents, lambda node: node not in on_path)
                     for parent in parents[node] if parent in on_path}
        if not junctions:
            return None
        merged = {group_of[j] for j in junctions if j in group_of}
        target = min(merged) if merged else len(groups)
        if not merged:
            groups.append(([], set()))
        for other in sorted(merged - {target}):  # a parameter joining two groups merges them
            groups[target][0].extend(groups[other][0])
            groups[target][1].update(groups[other][1])
            groups[other] = ([], set())
        groups[target][0].append(param)
        groups[target][1].update(junctions)
        for j in groups[target][1]:
            group_of[j] = target
    groups = [(ps, js) for ps, js in groups if ps]
    for _, junctions in groups:
        if len(junctions) > 1 and any(
                j in junctions for j in _upstream([p for j in junctions for p in parents[j]], parents,
                                                  lambda node: node in on_path)):
            return None
    return WeightPass([(ps, [GradientEdge(j, nr) for j in js for nr in sorted(used[j])]) for ps, js in groups])


def input_backward(output: torch.Tensor, grad: torch.Tensor | None, inputs: torch.Tensor,
                   weights: WeightPass) -> torch.Tensor:
    """I: the input gradient, and in the same call the gradient each junction output receives
    (captured on the way, as autograd.grad captures any input; `weights.run()` starts from them)."""
    edges = [edge for _, group in weights.groups for edge in group]
    input_grad, *received = torch.autograd.grad(output, [inputs, *edges], grad, retain_graph=True,
                                                allow_unused=True)
    weights.received = dict(zip(edges, received))
    return input_grad


def _upstream(start: list[Node], parents: dict[Node, list[Node]], keep) -> set[Node]:
    """`start` and every node above it (towards the output) that `keep` admits, walking only through admitted ones."""
    found = {node for node in start if keep(node)}
    queue = deque(found)
    while queue:
        for parent in parents[queue.popleft()]:
            if parent not in found and keep(parent):
                found.add(parent)
                queue.append(parent)
    return found
