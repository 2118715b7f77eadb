"""Best-of-N: the proxy's argmax among the first N cached draws, judged like a policy, with KL log N - (N-1)/N."""

import json
import math

import mlflow
import pytest
import torch

import bench.sampling.generation
from bench.core.errors import ConfigError
from bench.core.models import load_tokenizer
from bench.evaluation.best_of_n import best_of, best_of_n_kl, check_ns, evaluate_best_of_n
from bench.evaluation.evaluate import EvalSettings
from bench.runs import tracking
from modules.reward_model import load_reward_model


def test_kl_follows_the_formula():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 3 / 4)
    assert best_of_n_kl(64) == pytest.approx(4.1589 - 0.984375, abs=1e-4)
    assert all(best_of_n_kl(n) < best_of_n_kl(2 * n) for n in (1, 2, 8, 32))


def test_best_of_takes_the_argmax_of_the_first_n():
    scores = torch.tensor([[0.1, 0.9, 0.3, 2.0], [1.5, -1.0, 0.2, 0.0]])
    assert best_of(scores, 1).tolist() == [0, 0]
    assert best_of(scores, 2).tolist() == [1, 0]
    assert best_of(scores, 4).tolist() == [3, 0]


def test_bad_n_is_refused():
    for ns in ([], [0, 4], ["4"], [2.5]):
        with pytest.raises(ConfigError, match="best_of_n must be a list of integers >= 1"):
            check_ns(ns)


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_each_n_is_a_judged_run_whose_samples_are_the_proxys_choice(workdir, hh_path, reward_models, monkeypatch):
    monkeypatch.setattr(bench.sampling.generation, "cache_dir", lambda: workdir / "cache")
    settings = EvalSettings.from_dict({"n_prompts": 4, "judge": reward_models["judge"], "proxy": reward_models["proxy"],
                                       "sampling": {"max_new_tokens": 6, "batch_size": 8, "temperature": 1.0}})
    data = {"path": hh_path, "max_length": 128, "max_prompt_length": 64}
    runs = evaluate_best_of_n("tiny", data, settings, [1, 3], "tiny")
    client = mlflow.MlflowClient(tracking.tracking_uri())  # not mlflow's global URI, which an earlier run may have set
    proxy = load_reward_model(reward_models["proxy"], role="proxy")
    draws = json.loads(next((workdir / "cache" / "best_of_n").glob("*.json")).read_text())["draws"]
    tokenizer = load_tokenizer("tiny")
    for n, run_id in runs.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["algorithm"] == "best-of-n"
        assert run.data.metrics["eval/kl"] == pytest.approx(best_of_n_kl(n))
        assert 0 <= run.data.metrics["eval/win_rate_vs_chosen"] <= 1 and "eval/proxy_score" in run.data.metrics
        table = json.loads(open(client.download_artifacts(run_id, "eval/samples.json")).read())
        rows = [dict(zip(table["columns"], values)) for values in table["data"]]
        for row, prompt_draws in zip(rows, draws):
            texts = bench.sampling.generation.decode_responses(tokenizer, prompt_draws[:n])
            scores = proxy.score([row["prompt"]] * n, texts)
            assert row["policy"] == texts[int(scores.argmax())]
            assert row["proxy_policy"] == pytest.approx(float(scores.max()), abs=1e-5)
    assert len(draws) == 4 and all(len(d) == 3 for d in draws)  # drawn once, for the largest N
