"""Aggregation cost of every defense, as a ratio to FedAvg's and to Flower's own implementation.

For n client updates shaped like a real model (LeNet, ~62 k parameters; ResNet-18, ~11.2 M), each
strategy's `aggregate_train` runs on the SAME Flower reply messages, side by side in one process:
- ratio to thorn's FedAvg on those messages (what a defense costs on top of plain averaging);
- for krum, multikrum, bulyan, median and trimmed_mean, ratio to Flower 1.41's built-in Message-API
  strategy implementing the same rule (`flwr.serverapp.strategy.Krum`, ...), on those messages.
Both include turning the replies into tensors/arrays, which each implementation has to do.

    python bench/aggregation.py                         # n = 10, 50, 100; lenet and resnet18
    python bench/aggregation.py --n 10 50 --models lenet --repeats 3

Times are the median of `--repeats` runs (Flower's: one run in the largest setting, where each takes tens of
seconds to minutes). FLTrust's time includes its server-side training on a 64-image root set. Nothing here is
asserted: it prints a table.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from server.app import build_strategy  # noqa: E402
from strategies.base import ServerContext  # noqa: E402
from task.config import compose_config, group_options  # noqa: E402
from task.data import InputSpec  # noqa: E402
from task.models import LeNet, ResNet18, trainable_state_keys  # noqa: E402
from task.train import LocalTrainingConfig  # noqa: E402

MODELS = {"lenet": (LeNet, 1, 28), "resnet18": (ResNet18, 3, 32)}
FLOWER_EQUIVALENT = {  # thorn strategy -> (Flower class name, constructor kwargs given f and n)
    "krum": ("Krum", lambda f, n: {"num_malicious_nodes": f}),
    # thorn's default m = n - f (the paper's); Flower's MultiKrum defaults to m = 1, which is Krum
    "multikrum": ("MultiKrum", lambda f, n: {"num_malicious_nodes": f, "num_nodes_to_select": n - f}),
    "bulyan": ("Bulyan", lambda f, n: {"num_malicious_nodes": f}),
    "median": ("FedMedian", lambda f, n: {}),
    "trimmed_mean": ("FedTrimmedAvg", lambda f, n: {"beta": 0.2}),
}


# Rules that train or evaluate a model per client on the server (SDFC's Fisher calibration, CLIP-Fed's
# teacher scores): at 100 x 11 M they take minutes and need the models unpacked per client. The default run
# leaves them out of that one setting; naming them with --strategies runs them.
PER_CLIENT_RULES = {"sdfc", "clipfed"}
LARGE_SETTING = 500_000_000  # n x d from which the default run leaves PER_CLIENT_RULES out


def make_messages(model: torch.nn.Module, n: int, seed: int) -> tuple[dict, list[Message]]:
    """The global model and n replies whose models are global + small random updates."""
    TaskIdentity.task_id = TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    gen = torch.Generator().manual_seed(seed)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    replies = []
    for i in range(n):
        # the instruction a reply answers; its content does not matter here, and 100 copies of a
        # ResNet-18 would hold another 4.4 GB
        sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1000 + i, message_type="train")
        state = {k: (v + 0.01 * torch.randn(v.shape, generator=gen)) if torch.is_floating_point(v) else v
                 for k, v in global_state.items()}
        content = RecordDict({"arrays": ArrayRecord(state),
                              "metrics": MetricRecord({"num-examples": 100 + i, "train-loss": 1.0})})
        replies.append(Message(content, reply_to=sent))
    return global_state, replies


def server_context(model_cls, channels: int, size: int) -> ServerContext:
    rng = np.random.default_rng(0)
    return ServerContext(x_val=rng.integers(0, 255, (64, size, size, channels), dtype=np.uint8),
                         y_val=rng.integers(0, 10, 64).astype(np.int64),
                         spec=InputSpec((0.5,) * channels, (0.5,) * channels, size, channels),
                         build_model=lambda: model_cls(channels, 10, size), device=torch.device("cpu"),
                         local=LocalTrainingConfig(epochs=1, lr=0.01, batch_size=32), seed=0)


def thorn_aggregation(setting: tuple, name: str):
    """A zero-argument call of thorn strategy `name`'s aggregate_train on the setting's replies."""
    model, model_cls, channels, size, n, global_state, replies = setting
    strategy = build_strategy(compose_config([f"strategy={name}", f"num_clients={n}", "min_train_clients=1"]))
    strategy.trainable_keys = trainable_state_keys(model)
    if strategy.needs_server_data:
        strategy.server_context = server_context(model_cls, channels, size)
    strategy.check_preconditions(n)  # ValueError: this n cannot work with this rule
    strategy.global_state = global_state
    return partial(strategy.aggregate_train, 1, replies)


def fresh_replies(model: torch.nn.Module, n: int) -> list[Message]:
    return make_messages(model, n, seed=n)[1]


def time_call(fn, repeats: int, setup=None) -> float:
    """Median seconds of `fn(setup())` (setup untimed; None: `fn()`)."""
    times = []
    for _ in range(repeats):
        arg = setup() if setup is not None else None
        gc.collect()
        t0 = time.perf_counter()
        fn() if setup is None else fn(arg)
        times.append(time.perf_counter() - t0)
        del arg
    return statistics.median(times)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--models", nargs="+", default=["lenet", "resnet18"], choices=sorted(MODELS))
    parser.add_argument("--strategies", nargs="+", default=None, help="default: every conf/strategy option")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-malicious", type=int, default=3,
                        help="f for Flower's rules whose thorn config has none (those that have one use its f)")
    args = parser.parse_args()
    names = args.strategies or group_options("strategy")
    import flwr.serverapp.strategy as flower_strategies

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times in seconds (median of runs)")
    for model_name in args.models:
        model_cls, channels, size = MODELS[model_name]
        torch.manual_seed(0)
        model = model_cls(channels, 10, size)
        d = sum(p.numel() for p in model.parameters())
        for n in args.n:
            flower_repeats = 1 if n * d >= LARGE_SETTING else args.repeats
            global_state, replies = make_messages(model, n, seed=n)
            rows = []

            setting = (model, model_cls, channels, size, n, global_state, replies)
            thorn_aggregation(setting, "fedavg")()  # warm-up (allocator, caches), untimed
            fedavg = time_call(thorn_aggregation(setting, "fedavg"), args.repeats)
            for name in names:
                if args.strategies is None and name in PER_CLIENT_RULES and n * d >= LARGE_SETTING:
                    rows.append([name, None, None, None, "left out of the default run at this size "
                                 "(server-side work per client; run it with --strategies)"])
                    continue
                try:
                    seconds = time_call(thorn_aggregation(setting, name), args.repeats)
                except ValueError as exc:  # a precondition that this n cannot meet
                    rows.append([name, None, None, None, str(exc)])
                    continue
                rows.append([name, seconds, seconds / fedavg, None, None])
                print(f"  {name}: {seconds:.3f} s", flush=True)
            # Flower's rules run after every thorn rule, on freshly built replies (their FedMedian,
            # FedTrimmedAvg and Bulyan empty the replies they aggregate), and with thorn's replies freed:
            # at 100 x 11 M both sets of replies and Flower's working copies would not fit in 24 GiB.
            del replies, setting
            gc.collect()
            for row in rows:
                name, seconds = row[0], row[1]
                if seconds is None or name not in FLOWER_EQUIVALENT:
                    continue
                cls_name, kwargs = FLOWER_EQUIVALENT[name]
                # the same f as thorn's rule (its config), so both solve the same problem
                f = compose_config([f"strategy={name}"]).strategy.get("num_malicious", args.num_malicious)
                flower = getattr(flower_strategies, cls_name)(**kwargs(int(f), n))
                flower_seconds = time_call(lambda fresh, flower=flower: flower.aggregate_train(1, fresh),
                                           flower_repeats, setup=partial(fresh_replies, model, n))
                row[3], row[4] = flower_seconds / seconds, flower_seconds
                print(f"  Flower {cls_name}: {flower_seconds:.3f} s", flush=True)
            print(f"\n{model_name} (d = {d:,} parameters), n = {n} clients, FedAvg {fedavg:.3f} s")
            print(f"{'strategy':<16}{'seconds':>10}{'x FedAvg':>10}{'Flower s':>10}{'Flower/thorn':>14}")
            for name, seconds, ratio, flower_ratio, extra in rows:
                if seconds is None:
                    print(f"{name:<16}  n/a: {extra}")
                    continue
                flower_cols = (f"{extra:>10.3f}{flower_ratio:>13.1f}x" if flower_ratio is not None
                               else f"{'':>10}{'':>14}")
                print(f"{name:<16}{seconds:>10.3f}{ratio:>10.2f}{flower_cols}", flush=True)
            print(f"peak resident memory of this process so far: {peak_rss_gib():.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
