"""RRHF and PPO on the tiny model: the ranked view and its cache, each loss inside its module against
a hand computation, PPO's per-token rewards and updates, MLflow metrics, and bad input."""

import logging

import lightning.pytorch as L
import mlflow
import pytest
import torch

import bench.sampling.generation
import datamodules.candidates
from bench.cli import main
from bench.core.models import resolve
from bench.sampling.generation import Sampling
from datamodules.formatting import Formatter
from datamodules.hh_datamodule import HHRLHFDataModule
from datamodules.hh_rlhf import load_splits
from modules.logps import sequence_logps
from modules.online import Samples, Sequences
from modules.ppo import PPO, Rollout
from modules.reward_model import load_proxy, load_reward_model
from modules.rrhf import RRHF

PPO_METRICS = ["objective/kl", "objective/scores", "objective/rlhf_reward", "objective/entropy", "policy/approxkl",
               "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac", "val/num_eos_tokens"]


@pytest.fixture
def candidate_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.sampling.generation, "cache_dir", lambda: tmp_path / "cache")
    return tmp_path / "cache" / "rrhf_candidates"


def ranked_datamodule(hh_path, proxy, **kwargs):
    settings = dict(path=hh_path, tokenizer="tiny", view="ranked", proxy=proxy, num_candidates=4, max_length=96,
                    max_prompt_length=48, batch_size=3, max_train_pairs=6, max_val_pairs=2,
                    candidate_sampling=Sampling(max_new_tokens=8))
    dm = HHRLHFDataModule(**{**settings, **kwargs})
    dm.load_proxy = load_proxy  # as bench.runs.training gives it: the data layer does not import the reward model
    dm.setup("fit")
    return dm


def test_ranked_view_scores_every_candidate_with_the_proxy_and_caches(hh_path, reward_models, candidate_cache,
                                                                      caplog, monkeypatch):
    dm = ranked_datamodule(hh_path, reward_models["proxy"])
    assert len(list(candidate_cache.glob("*.json"))) == 2  # train and validation
    row = dm.views["train"][0]
    pair = load_splits(hh_path)[0]["train"][0]
    formatter = Formatter(dm.tokenizer, True, 96, 48)
    assert len(row["candidate_ids"]) == len(row["rewards"]) == 4
    assert row["candidate_ids"][:2] == formatter.truncate(row["prompt_ids"], [formatter.response_ids(pair.chosen),
                                                                             formatter.response_ids(pair.rejected)])[1]
    assert all(0 < len(c) <= 8 for c in row["candidate_ids"][2:])
    proxy = load_reward_model(reward_models["proxy"], "proxy")
    torch.testing.assert_close(torch.tensor(row["rewards"][:2]), proxy.score([pair.prompt] * 2, [pair.chosen, pair.rejected]),
                               atol=1e-5, rtol=1e-5)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 3 * 4 and batch["rewards"].shape == batch["candidate_mask"].shape == (3, 4)

    # A rerun samples nothing and scores nothing: both come from the cache.
    def fail(*args, **kwargs):
        raise AssertionError("the cache should have served this")

    monkeypatch.setattr(datamodules.candidates, "sample", fail)
    monkeypatch.setattr(datamodules.candidates, "load_causal_lm", fail)
    with caplog.at_level(logging.INFO, logger="datamodules.candidates"):
        again = ranked_datamodule(hh_path, reward_models["proxy"])
    assert again.views["train"][:] == dm.views["train"][:]
    assert sum("reusing cached candidates" in r.getMessage() for r in caplog.records) == 2
    # Other sampling settings are another cache entry.
    with pytest.raises(AssertionError, match="the cache should have served this"):
        ranked_datamodule(hh_path, reward_models["proxy"], candidate_sampling=Sampling(max_new_tokens=8, temperature=0.5))


@pytest.mark.parametrize("sft_reduction", ["sum", "mean"])
def test_rrhf_loss_is_weighted_ranking_plus_sft_of_the_best(hh_path, reward_models, candidate_cache, sft_reduction):
    dm = ranked_datamodule(hh_path, reward_models["proxy"])
    batch = next(iter(dm.train_dataloader()))
    module = RRHF(policy="tiny", rank_weight=0.5, sft_reduction=sft_reduction)
    module.configure_model()
    loss, metrics = module.loss_and_metrics(batch)
    with torch.no_grad():
        logps = sequence_logps(module.policy, batch)
        scores, totals = logps.mean.view(3, 4), logps.total.view(3, 4)
    rewards, valid = batch["rewards"], batch["candidate_mask"]
    rank, sft, agree, pairs = 0.0, 0.0, 0, 0
    for b in range(3):
        for i in range(4):
            for j in range(4):
                if valid[b, i] and valid[b, j] and rewards[b, i] < rewards[b, j]:
                    rank += max(0.0, (scores[b, i] - scores[b, j]).item())
                    agree, pairs = agree + int(scores[b, i] < scores[b, j]), pairs + 1
        best = max((i for i in range(4) if valid[b, i]), key=lambda i: rewards[b, i])
        sft -= (totals if sft_reduction == "sum" else scores)[b, best].item()  # the paper's sum over tokens
    # The hinge sums differences of mean log-probs near -10, which fp32 carries to about 1e-6 each: a small sum
    # (0.004 in one CI run, off by 6e-7 between the batched and the per-row forward) is compared absolutely.
    assert metrics["loss_rank"].item() == pytest.approx(rank / 3, rel=1e-4, abs=1e-5)
    assert metrics["loss_sft"].item() == pytest.approx(sft / 3, rel=1e-4)
    assert loss.item() == pytest.approx(0.5 * rank / 3 + sft / 3, rel=1e-4)
    assert metrics["rank_accuracy"] == (pytest.approx(agree / pairs), pairs)


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_rrhf_trains_from_the_cli_and_a_rerun_reuses_the_candidates(workdir, hh_path, reward_models, candidate_cache,
                                                                    caplog):
    argv = ["train", "rrhf", "--recipe", "tiny", f"--data.path={hh_path}", f"--data.proxy={reward_models['proxy']}",
            "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--eval=false"]
    main(argv)
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    for name in ("train/loss", "train/loss_rank", "train/loss_sft", "train/rank_accuracy", "val/rank_accuracy"):
        assert name in run.data.metrics, name
    assert 0 <= run.data.metrics["train/rank_accuracy"] <= 1
    assert run.data.tags["proxy"] == reward_models["proxy"] and run.data.params["data.num_candidates"] == "3"
    with caplog.at_level(logging.INFO, logger="datamodules.candidates"):
        main(argv)
    assert any("reusing cached candidates" in r.getMessage() for r in caplog.records)


def test_ppo_rewards_are_the_kl_penalty_plus_the_score_at_the_last_token(reward_models):
    module = PPO(policy="tiny", proxy=reward_models["proxy"], kl_coef=0.1)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, 0.0, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-3.0, 0.0, 0.0]])
    samples = Samples(Sequences(torch.zeros(2, 5), torch.ones(2, 5), 2), mask, scores=torch.tensor([2.0, -1.0]),
                      ended=torch.tensor([True, False]), per_prompt=1, kl=torch.tensor([0.25, 1.25]))
    rollout = Rollout(samples, logprobs, ref_logprobs, torch.zeros(2, 3))
    metrics, rewards = module.rollout_metrics(rollout, kl_coef=0.1)
    # kl per token: [0.5, -1, 0], [2, 0, 0]; rewards -0.1 * kl, plus the score on the last real token
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.2 - 1.0, 0.0, 0.0]]))
    assert metrics["objective/kl"].item() == pytest.approx(0.75)  # the exact KL the rollout measured
    assert metrics["objective/kl_estimate"].item() == pytest.approx((-0.5 + 2.0) / 2)  # what the penalty uses
    assert metrics["objective/scores"].item() == pytest.approx(0.5)
    assert metrics["objective/rlhf_reward"].item() == pytest.approx(0.5 - 0.1 * 1.5 / 2)
    assert metrics["objective/entropy"].item() == pytest.approx((3.5 + 1.0) / 2)


@pytest.mark.parametrize("share_value_backbone", [False, True])
def test_ppo_step_updates_policy_and_value_and_keeps_the_reference(hh_path, reward_models, share_value_backbone,
                                                                   tmp_path):
    dm = HHRLHFDataModule(path=hh_path, tokenizer="tiny", view="prompts", max_length=96, max_prompt_length=48,
                          batch_size=4, max_train_pairs=8, max_val_pairs=4)
    module = PPO(policy="tiny", proxy=reward_models["proxy"], max_new_tokens=6, ppo_epochs=2, num_mini_batches=2,
                 lr=1e-3, share_value_backbone=share_value_backbone)
    module.configure_model()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 4  # 2 epochs x 2 mini-batches
    changed = {name for name, p in module.named_parameters() if not torch.equal(p, before[name])}
    assert any(n.startswith("policy.") for n in changed) and any(n.startswith("value_head.") for n in changed)
    assert not any(n.startswith(("reference.", "proxy.")) for n in changed)
    assert any(n.startswith("value_backbone.") for n in changed) != share_value_backbone
    metrics = trainer.callback_metrics
    assert metrics["train/objective/kl"].item() == 0.0  # the first rollout's policy is the reference
    assert 0 < metrics["train/response_len"].item() <= 6


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_ppo_trains_from_the_cli_against_the_latest_proxy(workdir, hh_path):
    main(["train", "rm", "--recipe", "tiny", f"--data.path={hh_path}", "--model.role=proxy",
          "--trainer.max_steps=1", "--trainer.limit_val_batches=0"])
    main(["train", "ppo", "--recipe", "tiny", f"--data.path={hh_path}", "--eval=false"])
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], order_by=["start_time ASC"])
    proxy_run, ppo_run = runs
    assert proxy_run.data.tags["role"] == "proxy" and ppo_run.data.tags["algorithm"] == "ppo"
    assert ppo_run.data.tags["proxy"] == proxy_run.data.tags["output_path"] == ppo_run.data.params["model.proxy"]
    for name in PPO_METRICS:
        history = client.get_metric_history(ppo_run.info.run_id, f"train/{name}")
        assert len(history) == 2, name  # one point per rollout
    assert "val/objective/scores" in ppo_run.data.metrics and "val/num_eos_tokens" in ppo_run.data.metrics


@pytest.mark.parametrize(
    "algorithm, args, message",
    [
        ("rrhf", ["--data.num_candidates=1", "--data.proxy={proxy}"], "data.num_candidates (RRHF's k) must be >= 2"),
        ("rrhf", ["--data.proxy={policy}"], "is not a reward model"),
        ("rrhf", ["--data.proxy={judge}"], "was trained as the judge"),
        ("ppo", ["--model.proxy={judge}"], "was trained as the judge"),
        ("ppo", ["--model.proxy={policy}"], "is not a reward model"),
        ("ppo", ["--model.proxy={proxy}", "--model.ppo_epochs=0"], "model.ppo_epochs must be >= 1"),
        ("ppo", [], "no finished proxy reward model in experiment 'tiny'"),
    ],
)
def test_bad_rrhf_and_ppo_input(workdir, hh_path, reward_models, capsys, algorithm, args, message):
    paths = {**reward_models, "policy": resolve("tiny")}
    argv = ["train", algorithm, "--recipe", "tiny", f"--data.path={hh_path}", *[a.format(**paths) for a in args]]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (workdir / "mlflow.db").exists() and not (workdir / "runs").exists()  # nothing left behind


def test_a_judge_is_a_proxy_only_on_purpose(reward_models):
    module = PPO(policy="tiny", proxy=reward_models["judge"], allow_judge_as_proxy=True)
    assert module.hparams.allow_judge_as_proxy
