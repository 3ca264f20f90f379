"""The split backward (paci.runtime.split): I + W give a backward's numbers bit for bit, and W
re-runs nothing on the input's path: only the junctions run twice, once in each pass."""

from __future__ import annotations

from collections import Counter, deque

import pytest
import torch
from torch import nn

from paci.model import build_units, lm_loss, num_units
from paci.runtime import split
from pipeline_helpers import TINY


def _all_nodes(output: torch.Tensor) -> list:
    seen, queue = {output.grad_fn}, deque([output.grad_fn])
    while queue:
        for child, _ in queue.popleft().next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                queue.append(child)
    return list(seen)


def _graph(module: nn.Module, last: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, TINY.block_size, TINY.n_embd, generator=gen).requires_grad_()
    output = module(x)
    if last:
        targets = torch.randint(TINY.vocab_size, (2, TINY.block_size), generator=gen)
        return x, lm_loss(output, targets), None
    return x, output, torch.randn(output.shape, generator=gen)


@pytest.mark.parametrize("last", [False, True])
def test_input_then_weight_pass_equal_one_backward_bit_for_bit(last):
    """A middle stage (blocks) and a last stage (blocks + head + loss) of the tiny GPT."""
    stop = num_units(TINY) if last else num_units(TINY) - 1
    module = nn.Sequential(*build_units(TINY, 0, 1, stop))
    params = list(module.parameters())
    x, output, grad = _graph(module, last)
    output.backward(grad)
    expected_input, expected = x.grad.clone(), [p.grad.clone() for p in params]
    module.zero_grad(set_to_none=True)

    x, output, grad = _graph(module, last)
    weights = split.plan(output, x, params)
    assert weights is not None and sum(len(ps) for ps, _ in weights.groups) == len(params)
    counts: Counter = Counter()
    hooks = [node.register_prehook(lambda grads, node=node: counts.update([node])) for node in _all_nodes(output)]
    input_grad = split.input_backward(output, grad, x, weights)
    assert all(p.grad is None for p in params)  # I took no weight gradient
    weights.run()
    for hook in hooks:
        hook.remove()
    assert torch.equal(input_grad, expected_input)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, expected))
    junctions = {edge.node for _, edges in weights.groups for edge in edges}
    assert {node for node, n in counts.items() if n > 1} == junctions
    assert all(counts[node] == 2 for node in junctions)


def test_a_weight_used_twice_in_a_row_falls_back():
    """lin(lin(x)): the later junction lies upstream of the earlier one on the input's path, so one
    call per group would count the gradient twice; `plan` declines and the stage re-walks."""
    lin = nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    assert split.plan(lin(lin(x)).sum(), x, list(lin.parameters())) is None


def test_a_weight_used_twice_side_by_side_is_split_exactly():
    lin = nn.Linear(4, 4)
    params = list(lin.parameters())

    def run():
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
        return x, (torch.tanh(lin(x)) * lin(x.flip(0))).sum()

    x, output = run()
    output.backward()
    expected_input, expected = x.grad.clone(), [p.grad.clone() for p in params]
    lin.zero_grad(set_to_none=True)
    x, output = run()
    weights = split.plan(output, x, params)
    assert weights is not None and len(weights.groups) == 1 and len(weights.groups[0][1]) == 2  # two junctions
    assert torch.equal(split.input_backward(output, None, x, weights), expected_input)
    weights.run()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, expected))


def test_no_split_without_an_input_gradient():
    """Stage 0 (token ids in): its W is the whole backward."""
    module = nn.Sequential(*build_units(TINY, 0, 0, 2))
    tokens = torch.randint(TINY.vocab_size, (2, TINY.block_size))
    assert split.plan(module(tokens), tokens, list(module.parameters())) is None
