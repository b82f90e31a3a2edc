"""The simulation-only server-side wrapper of omniscient attacks: rewrites attacking replies from the
benign ones, before the truth is stripped and before any defense sees the replies."""

from __future__ import annotations

import torch
from flower_messages import reply_to, train_message

from server.omniscient import OmniscientRewriter
from server.truth import TruthStrippingGrid


def test_attacking_replies_become_global_plus_crafted_update(flower_task_identity):
    def model(w, mean, steps):
        return {"w": torch.tensor(w), "bn.running_mean": torch.tensor([mean]),
                "bn.num_batches_tracked": torch.tensor(steps)}

    g = model([1.0, 1.0], 0.0, 3)
    local = {1: model([2.0, 1.0], 1.0, 4), 2: model([1.0, 3.0], 3.0, 4), 3: model([9.0, 9.0], 9.0, 4)}
    sent = [train_message(n, g) for n in local]
    replies = [reply_to(m, local[n], 10, truth=(n == 3)) for m, n in zip(sent, local, strict=True)]
    calls = []

    def negative_mean(benign, num_malicious):  # an IPM-like rule with epsilon 1
        calls.append((benign.clone(), num_malicious))
        return -benign.mean(0)

    rewriter = OmniscientRewriter("test", negative_mean, trainable_keys=["w"], num_clients=3)
    out = rewriter(sent, replies)
    benign_updates, num_malicious = calls[0]
    assert num_malicious == 1
    assert torch.equal(benign_updates, torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # local - global, benign only
    attacked = out[2].content["arrays"].to_torch_state_dict()
    assert torch.allclose(attacked["w"], torch.tensor([0.5, 0.0]))           # global + (-mean update)
    assert torch.allclose(attacked["bn.running_mean"], torch.tensor([2.0]))  # benign mean of the buffer
    assert attacked["bn.num_batches_tracked"].item() == 4                   # its own integer buffer
    assert torch.equal(out[0].content["arrays"].to_torch_state_dict()["w"], local[1]["w"])
    assert rewriter.rewritten_last_round == 1
    # a defense's query round (e.g. periodic pruning) after the train round keeps the round's count
    query = train_message(1, g)
    query.metadata.__dict__["_message_type"] = "query.pruning_activations"
    rewriter([query], [reply_to(query, local[1], 10)])
    assert rewriter.rewritten_last_round == 1


def test_rewrite_happens_before_the_truth_is_stripped(flower_task_identity):
    g = {"w": torch.zeros(2)}
    sent = [train_message(n, g) for n in (1, 2)]
    replies = [reply_to(sent[0], {"w": torch.ones(2)}, 10, truth=False),
               reply_to(sent[1], {"w": torch.ones(2)}, 10, truth=True)]

    class Inner:
        def push_messages(self, messages):
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, ids):
            return [replies.pop(0)] if replies else []

    seen_truth_in_rewriter = []

    def rewrite(sent_msgs, got):
        seen_truth_in_rewriter.append(all("truth" in r.content for r in got))
        return got

    grid = TruthStrippingGrid(Inner(), lambda *a: None, rewrite_replies=rewrite)
    out = grid.send_and_receive(sent, timeout=5)
    assert seen_truth_in_rewriter == [True]
    assert all("truth" not in r.content for r in out)
