import torch

from bigmodel.objectives.seq_cls import EpochBatches


class Lengths:
    """What EpochBatches reads of a split: its size, token lengths, and rows → batch."""

    def __init__(self, lengths: list[int]):
        self.lengths = torch.tensor(lengths)
        self.ids = torch.zeros(len(lengths), 1)

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


def test_epoch_batches_cover_every_example_once_with_batches_of_like_lengths():
    lengths = torch.randint(4, 129, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    data = Lengths(lengths)
    draw = EpochBatches(data, batch_size=16, seed=1, pool=10)
    n_batches = -(-1000 // 16)
    epoch = [draw() for _ in range(n_batches)]
    assert sorted(torch.cat(epoch).tolist()) == list(range(1000))  # each example exactly once
    spread = [int(data.lengths[b].max() - data.lengths[b].min()) for b in epoch]
    assert sum(spread) / len(spread) < 20  # random batches of 16 from 4..128 spread ≈ 110
    again = EpochBatches(data, batch_size=16, seed=1, pool=10)
    assert all(torch.equal(a, again()) for a in epoch)  # the seed fixes every batch
    assert not torch.equal(torch.cat(epoch), torch.cat([draw() for _ in range(n_batches)]))
