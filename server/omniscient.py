"""SIMULATION-ONLY: the server-side wrapper of omniscient attacks (LIE, IPM, min-max).

These attacks craft the malicious update from the BENIGN clients' updates of the same round. A real
attacker would need to see other clients' uploads, which no client can in a Flower deployment, so
they cannot be written as a client: in simulation thorn runs them here, between the engine and the
strategy. `OmniscientRewriter` is called by the ServerApp's grid wrapper (server/truth.py) once all
replies of a round are in, BEFORE the truth records are stripped and BEFORE the defense sees
anything; it reads the truth (who attacked this round) and replaces each attacking client's model by
global + crafted update. Its use is announced in the log and written to the records.

The attack math is pure and lives in attacks/omniscient.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from logging import INFO

import torch
from flwr.app import ArrayRecord, Message
from flwr.common import log

from strategies.aggregation import flatten_states, unflatten_vector

TRUTH_KEY = "truth"


class OmniscientRewriter:
    def __init__(self, name: str, attack_fn: Callable[..., torch.Tensor], trainable_keys: list[str],
                 num_clients: int) -> None:
        self.name = name
        self.attack_fn = attack_fn
        self.trainable_keys = trainable_keys
        self.num_clients = num_clients
        self.rewritten_last_round = 0
        log(INFO, "[thorn] SIMULATION-ONLY omniscient attack %r: a server-side wrapper rewrites the attacking "
            "clients' replies from the benign ones before the defense runs", name)

    @staticmethod
    def craft(attack_fn: Callable[..., torch.Tensor], benign: torch.Tensor, num_clients: int,
              num_malicious: int) -> torch.Tensor:
        """Call the attack with the counts its signature asks for (LIE needs them, IPM does not)."""
        accepted = inspect.signature(attack_fn).parameters
        counts = {"num_clients": num_clients, "num_malicious": num_malicious}
        return attack_fn(benign, **{k: v for k, v in counts.items() if k in accepted})

    def __call__(self, sent: list[Message], replies: list[Message]) -> list[Message]:
        train_sent = [m for m in sent if m.metadata.message_type.startswith("train")]
        if not train_sent:  # a defense's query round: the count of the round's train replies stands
            return replies
        self.rewritten_last_round = 0
        global_state = train_sent[0].content["arrays"].to_torch_state_dict()
        ok = [r for r in replies if not r.has_error() and "arrays" in r.content]
        attacking = [r for r in ok if TRUTH_KEY in r.content and bool(r.content[TRUTH_KEY].get("is-malicious"))]
        benign = [r for r in ok if r not in attacking]
        if not attacking or not benign:
            return replies
        keys = self.trainable_keys
        global_vec = flatten_states([global_state], keys)[0]
        benign_states = [r.content["arrays"].to_torch_state_dict() for r in benign]
        updates = flatten_states(benign_states, keys) - global_vec
        crafted = self.craft(self.attack_fn, updates, self.num_clients, len(attacking))
        new_params = unflatten_vector(global_vec + crafted, global_state, keys)
        # buffers that are not trained (BatchNorm statistics) take the benign clients' mean
        buffers = {k: torch.stack([s[k].to(torch.float64) for s in benign_states]).mean(0).to(global_state[k].dtype)
                   for k, v in global_state.items() if k not in new_params and torch.is_floating_point(v)}
        for reply in attacking:
            own = reply.content["arrays"].to_torch_state_dict()
            state = {k: new_params.get(k, buffers.get(k, own[k])) for k in global_state}
            reply.content["arrays"] = ArrayRecord(state)
        self.rewritten_last_round = len(attacking)
        return replies
