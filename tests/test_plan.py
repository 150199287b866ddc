"""The step's plan (daro_lab.trainer.plan): which prompts each rank runs in each mini-batch and pass."""

import itertools

import pytest
import torch

from daro_lab.distributed import split_range
from daro_lab.trainer.plan import plan_minibatches


def reference(P, mbp, mp, world, rank):
    """The plan as the trainer's loop wrote it before it was a function: [(mini-batch positions, [pass positions])]."""
    out = []
    for i in range(0, P, mbp):
        c = list(range(i, min(i + mbp, P)))
        share = -(-len(c) // world)
        per = mp if 0 < mp < share else share
        base, extra = divmod(len(c), world)
        start = rank * base + min(rank, extra)
        mine = c[start : start + base + (rank < extra)]
        out.append((c, [mine[j : j + per] for j in range(0, share, per)]))
    return out


@pytest.mark.parametrize(
    "P,mbp,mp,world", list(itertools.product([0, 1, 5, 9, 16], [1, 3, 4, 16], [0, 1, 2, 3], [1, 2, 3]))
)
def test_plan_covers_every_prompt_once_in_step_with_every_rank(P, mbp, mp, world):
    plans = [plan_minibatches(P, mbp, mp, world, r) for r in range(world)]
    assert len({len(p) for p in plans}) == 1 and len(plans[0]) == -(-P // mbp)
    for i in range(len(plans[0])):
        mb = [p[i] for p in plans]
        assert all(m.index == i and m.on_policy == (i == 0) for m in mb)
        assert len({len(m.passes) for m in mb}) == 1  # as many passes on every rank: collectives stay in step
        got = sorted(int(x) for m in mb for ps in m.passes for x in ps.positions)
        assert got == mb[0].positions.tolist()  # every prompt of the mini-batch exactly once
        for m in mb:
            for ps in m.passes:
                assert mp == 0 or len(ps.positions) <= mp
                assert ps.first == int(mb[0].positions[0])
    for r in range(world):  # the same as the loop's own arithmetic
        want = reference(P, mbp, mp, world, r)
        assert [(m.positions.tolist(), [ps.positions.tolist() for ps in m.passes]) for m in plans[r]] == want


def test_filler_passes_and_split():
    # 3 prompts over 2 ranks in passes of 1: rank 0 holds 2, rank 1 holds 1 and runs a filler pass
    r0, r1 = plan_minibatches(3, 3, 1, 2, 0)[0], plan_minibatches(3, 3, 1, 2, 1)[0]
    assert [ps.filler for ps in r0.passes] == [False, False] and [ps.filler for ps in r1.passes] == [False, True]
    assert split_range(7, 3, 0) == slice(0, 3) and split_range(7, 3, 2) == slice(5, 7)
    assert torch.equal(plan_minibatches(5, 2)[2].passes[0].positions, torch.tensor([4]))
    with pytest.raises(ValueError, match="rank=2"):
        plan_minibatches(4, 2, 0, 2, 2)
