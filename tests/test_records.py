"""Run records: formats, detection bookkeeping, checkpoints and resume without duplicated rounds."""

from __future__ import annotations

import json
import time

import torch

from server.records import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    RunRecorder,
    detection_counts,
    load_checkpoint,
    rates,
)
from strategies.base import RoundReport
from task.config import compose_config


def report(rnd: int, rejected=None, weights=None) -> RoundReport:
    return RoundReport(server_round=rnd, node_ids=[1, 2, 3, 4], weights=weights or {1: .25, 2: .25, 3: .25, 4: .25},
                       rejected=rejected or {}, failures=1, invalid={}, train_loss=0.7, t_aggregate=0.01,
                       skipped=False, client_seconds=[1.0, 2.0])


def test_detection_counts_and_rates():
    truth = {1: True, 2: False, 3: False, 4: True}
    det = detection_counts([1, 2, 3, 4], {1, 2}, truth)
    assert det == {"tp": 1, "fp": 1, "tn": 1, "fn": 1}
    assert rates(det) == (0.5, 0.5)
    assert detection_counts([9], set(), truth) is None  # no known truth: no counts


def test_round_rows_join_report_and_truth(tmp_path):
    rec = RunRecorder(tmp_path, compose_config())
    for node, malicious in {1: True, 2: False, 3: False, 4: False}.items():
        rec.record_truth(node, "train", {"is-malicious": malicious})
    rec.record_truth(2, "query.identity", {"is-malicious": True})  # not a train reply: ignored
    row = rec.round_row(1, report(1, rejected={1: "far"}, weights={1: 0.0, 2: .5, 3: .25, 4: .25}), 0.8, 0.1, 3.0)
    assert row["detection"] == {"tp": 1, "fp": 0, "tn": 3, "fn": 0}
    assert row["tpr"] == 1.0 and row["fpr"] == 0.0
    assert row["n_malicious"] == 1 and row["malicious_weight"] == 0.0
    assert row["t_client_max"] == 2.0 and row["t_client_sum"] == 3.0 and row["n_failed"] == 1
    rec.write_round(row)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert json.loads(lines[0])["round"] == 1
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "strategy:" in (tmp_path / "config.yaml").read_text()
    # per-client entries, by partition id, with the ground truth next to the weight
    assert [c["malicious"] for c in row["clients"]] == [True, False, False, False]
    assert [c["weight"] for c in row["clients"]] == [0.0, .5, .25, .25]


def test_a_defense_that_rejects_nobody_gets_no_detection_figures(tmp_path):
    rec = RunRecorder(tmp_path, compose_config())
    for node, malicious in {1: True, 2: False, 3: False, 4: False}.items():
        rec.record_truth(node, "train", {"is-malicious": malicious, "partition-id": 10 - node})
    plain = report(1)
    plain.filtering = False  # e.g. FedAvg: "TPR 0" would be no measurement
    row = rec.round_row(1, plain, 0.8, 0.1, 3.0)
    assert row["detection"] is None and row["tpr"] is None and row["fpr"] is None
    assert row["malicious_weight"] == 0.25  # the weight mass is still reported
    assert [c["client"] for c in row["clients"]] == [6, 7, 8, 9]  # ordered by partition id, not node id


def test_summary_reports_final_and_best(tmp_path):
    rec = RunRecorder(tmp_path, compose_config())
    for rnd, ma, asr in [(0, 0.1, 0.5), (1, 0.7, 0.9), (2, 0.6, 0.95)]:
        rec.write_round({"round": rnd, "ma": ma, "asr": asr})
    s = rec.write_summary(finished=True)
    assert (s["final_ma"], s["final_asr"], s["best_ma"], s["rounds"]) == (0.6, 0.95, 0.7, 2)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["finished"] is True and on_disk["versions"]["flwr"] == "1.41.0"


def test_nan_is_written_as_null(tmp_path):
    rec = RunRecorder(tmp_path, compose_config())
    rec.write_round({"round": 1, "ma": float("nan"), "asr": None})
    assert json.loads((tmp_path / METRICS_FILE).read_text())["ma"] is None


def test_checkpoint_roundtrip_and_resume_drops_rounds_after_it(tmp_path):
    cfg = compose_config()
    rec = RunRecorder(tmp_path, cfg)
    for rnd in range(4):
        rec.write_round({"round": rnd, "ma": 0.1 * rnd, "asr": 0.0})
    rec.round_seconds = {1: 1.0, 2: 2.0, 3: 3.0}
    rec.write_summary(finished=False)
    rec.save_checkpoint(2, {"w": torch.ones(2)}, {"history": [1, 2]})
    assert not (tmp_path / (CHECKPOINT_FILE + ".tmp")).exists()  # written through a temp file
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["round"] == 2 and torch.equal(ckpt["global_state"]["w"], torch.ones(2))
    assert ckpt["strategy_state"] == {"history": [1, 2]} and "torch" in ckpt["rng"]
    # the run died after writing round 3 but before its checkpoint: resuming from round 2 drops row 3
    resumed = RunRecorder(tmp_path, cfg, resume_from_round=2)
    rounds = [json.loads(line)["round"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert rounds == [0, 1, 2]
    assert resumed.round_seconds == {1: 1.0, 2: 2.0}
    assert load_checkpoint(tmp_path / "nowhere") is None


def test_wandb_offline_logs_the_same_rounds(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    rec = RunRecorder(tmp_path, compose_config("logger.wandb.mode=offline"))
    rec.write_round({"round": 1, "ma": 0.5, "asr": 0.25, "detection": {"tp": 1}})
    rec.write_summary(finished=True)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1

    def offline_log() -> bytes:  # the offline log `wandb sync` uploads
        return b"".join(f.read_bytes() for f in runs[0].glob("*.wandb"))

    # wandb's service process may still be flushing after finish() returns on a busy machine: wait for it
    deadline = time.time() + 60
    while not (b"final_asr" in offline_log() and b"best_ma" in offline_log()) and time.time() < deadline:
        time.sleep(0.5)
    log = offline_log()
    assert b"final_asr" in log and b"best_ma" in log  # the run summary reached the offline log
