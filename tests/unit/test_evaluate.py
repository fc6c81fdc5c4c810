import math

import numpy as np
import pandas as pd
import pytest
import torch

from bigmodel.models.gpt import GPT, GPTConfig
from bigmodel.tasks import clm, seq_cls


def test_classification_scores_match_a_hand_count():
    actual = ["a", "a", "b", "b", "c"]
    predicted = ["a", "b", "b", "b", "a"]
    s = seq_cls.classification_scores(actual, predicted, ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(3 / 5)
    # a: P=1/2 R=1/2 F1=1/2; b: P=2/3 R=1 F1=4/5; c: 0
    assert s["per_class"]["a"]["f1"] == pytest.approx(0.5)
    assert s["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert s["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 0) / 3)


def test_window_loss_is_the_mean_next_token_loss_over_consecutive_blocks():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    data = np.random.default_rng(0).integers(0, 30, 8 * 5 + 3).astype(np.uint16)
    with torch.no_grad():
        got = clm.window_loss(gpt, data, block=8, batch_size=2)
        x = torch.from_numpy(data[:40].astype(np.int64)).view(5, 8)
        y = torch.from_numpy(data[1:41].astype(np.int64)).view(5, 8)
        _, want = gpt(x, y)
    assert got == pytest.approx(want.item(), rel=1e-5)
    assert got == pytest.approx(math.log(30), abs=0.3)


def test_baselines_learn_an_easy_task_and_majority_predicts_the_mode():
    words = {"net": "socket http url request", "gui": "window button canvas widget"}
    rows = [{"text": f"{words[l]} item {i}", "label": l} for i in range(40) for l in words]
    rows += [{"text": f"{words['net']} extra {i}", "label": "net"} for i in range(10)]
    table = pd.DataFrame(rows)
    train, val, test = table.iloc[:60], table.iloc[60:75], table.iloc[75:]
    assert seq_cls.bow_baseline(train, val, test, seed=0) == test["label"].tolist()
    assert set(seq_cls.majority_baseline(train, test)) == {train["label"].mode()[0]}
