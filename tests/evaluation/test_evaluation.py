"""`bench eval` on the tiny recipe: every eval/ metric with CIs in MLflow, the reference-sample cache,
the untrained reference against itself, the pluggable judges, and bad input."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import mlflow
import pytest
import torch

import bench.core.precision
import bench.evaluation.evaluate
import bench.evaluation.judges
import bench.runs.tracking
import bench.sampling.generation
from bench.cli import main
from bench.core.errors import ConfigError
from bench.evaluation.evaluate import EvalSettings, make_judge
from bench.evaluation.judges import (
    JUDGES,
    ChatCompletionsJudge,
    Judge,
    RewardJudge,
    RewardModelJudge,
    ScoringJudge,
    judge_class,
)
from bench.evaluation.metrics import WinRate, bootstrap_ci

EVAL_KEYS = ["win_rate_vs_chosen", "win_rate_vs_ref", "judge_score", "proxy_score"]


@pytest.fixture
def sample_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.sampling.generation, "cache_dir", lambda: tmp_path / "cache")
    return tmp_path / "cache" / "reference_samples"


@pytest.fixture
def trained(workdir, hh_path, sample_cache):
    """A proxy, a judge and a DPO policy on the tiny recipe; the DPO run is evaluated when it ends."""
    main(["train", "rm", "--recipe", "tiny", f"--data.path={hh_path}", "--trainer.max_steps=1",
          "--trainer.limit_val_batches=0"])
    main(["train", "dpo", "--recipe", "tiny", f"--data.path={hh_path}", "--trainer.max_steps=1",
          "--trainer.limit_val_batches=0"])
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              filter_string="tags.algorithm = 'dpo'")
    return client, runs[0]


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_training_ends_with_a_full_evaluation_in_mlflow(trained, sample_cache):
    client, run = trained
    metrics = run.data.metrics
    for key in EVAL_KEYS:
        assert metrics[f"eval/{key}_ci_low"] <= metrics[f"eval/{key}"] <= metrics[f"eval/{key}_ci_high"]
    for key in ("win_rate_vs_chosen", "win_rate_vs_ref"):
        assert 0 <= metrics[f"eval/{key}"] <= 1
    assert {"eval/kl", "eval/response_len", "eval/pref_accuracy", "eval/pref_accuracy_untrained"} <= set(metrics)
    assert 0 < metrics["eval/response_len"] <= 12
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "eval")]
    assert "eval/samples.json" in artifacts and "eval/win_rates.png" in artifacts
    table = json.loads(open(client.download_artifacts(run.info.run_id, "eval/samples.json")).read())
    assert set(table["columns"]) >= {"prompt", "policy", "chosen", "reference", "judge_policy", "judge_chosen",
                                     "judge_reference"}
    assert len(table["data"]) == 8
    tags = run.data.tags
    assert tags["eval.judge.kind"] == "reward_model" and tags["eval.judge.trained_role"] == "judge"
    assert "rm-judge" in tags["eval.judge.path"]
    assert len(list(sample_cache.glob("*.json"))) == 1


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_a_second_evaluation_reuses_the_reference_samples(trained, sample_cache, caplog, monkeypatch):
    _, run = trained
    generated = []
    real_sample = bench.evaluation.evaluate.sample
    monkeypatch.setattr(bench.evaluation.evaluate, "sample",
                        lambda *a, **k: generated.append(k["desc"]) or real_sample(*a, **k))
    with caplog.at_level(logging.INFO, logger="bench.evaluation.evaluate"):
        main(["eval", run.info.run_id, "--recipe", "tiny"])
    assert generated == ["policy samples"]  # the reference was not sampled again
    assert "reusing cached reference samples" in caplog.text


def test_reference_samples_are_drawn_and_cached_in_the_precision_asked_for(tokenizer, sample_cache, monkeypatch):
    """bf16 and fp32 samples differ (a token flips at a near-tie), so neither is reused for the other; the
    sampling runs under the autocast the entry is keyed by, whoever calls (evaluation or best-of-N)."""
    from bench.core.models import load_causal_lm
    from bench.evaluation.evaluate import reference_samples
    from bench.sampling.generation import JsonCache, Sampling, model_fingerprint, reference_samples_key

    model = load_causal_lm("tiny")
    prompt_ids = [tokenizer("Human: hi\n\nAssistant:").input_ids] * 3
    sampling = Sampling(temperature=1.0, max_new_tokens=4, batch_size=3, seed=0)
    loads, autocast_seen = [], []
    real_sample = bench.evaluation.evaluate.sample
    monkeypatch.setattr(bench.evaluation.evaluate, "sample", lambda *a, **k: autocast_seen.append(
        torch.is_autocast_enabled("cpu")) or real_sample(*a, **k))
    load = lambda: loads.append(1) or model  # noqa: E731
    bf16 = reference_samples("tiny", load, tokenizer, prompt_ids, sampling, autocast=True)
    fp32 = reference_samples("tiny", load, tokenizer, prompt_ids, sampling, autocast=False)
    assert autocast_seen == [True, False] and len(loads) == 2  # the fp32 call did not reuse the bf16 entry
    assert reference_samples("tiny", load, tokenizer, prompt_ids, sampling, autocast=False) == fp32
    assert reference_samples("tiny", load, tokenizer, prompt_ids, sampling, autocast=True) == bf16
    assert len(loads) == 2 and len(list(sample_cache.glob("*.json"))) == 2
    # bf16 entries keep the key they had before keys recorded the precision
    drawn = Sampling(**{**sampling.__dict__, "seed": 1})
    before = JsonCache.key({"model": model_fingerprint("tiny"), "prompts": prompt_ids, "sampling": drawn.__dict__})
    assert reference_samples_key("tiny", prompt_ids, drawn, autocast=True) == before
    assert reference_samples_key("tiny", prompt_ids, drawn, autocast=False) != before
    # nor is an entry drawn on the CPU reused on a GPU, which rounds otherwise
    on_cpu = {reference_samples_key("tiny", prompt_ids, drawn, autocast=a) for a in (True, False)}
    monkeypatch.setattr(bench.core.precision, "inference_device", lambda: torch.device("cuda", 0))
    on_gpu = {reference_samples_key("tiny", prompt_ids, drawn, autocast=a) for a in (True, False)}
    assert len(on_gpu) == 2 and not on_gpu & on_cpu


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_untrained_reference_against_itself_is_even(workdir, hh_path, sample_cache, capsys):
    main(["train", "rm", "--recipe", "tiny", f"--data.path={hh_path}", "--trainer.max_steps=1",
          "--trainer.limit_val_batches=0", "--model.role=shared"])
    capsys.readouterr()
    main(["eval", "tiny", "--recipe", "tiny", f"--data-path={hh_path}", "--n-prompts", "32", "--proxy", "none"])
    metrics = json.loads(capsys.readouterr().out)
    low, rate, high = (metrics[f"eval/win_rate_vs_ref{s}"] for s in ("_ci_low", "", "_ci_high"))
    assert low <= 0.5 <= high and low < rate < high
    assert metrics["eval/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is its own reference


def test_win_rate_counts_ties_as_half_with_a_bootstrap_ci():
    metric = WinRate()
    metric.update(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([0.0, 2.0, 4.0, 1.0]))
    result = metric.compute()
    assert result["value"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert result["n"] == 4 and 0 <= result["ci_low"] <= result["value"] <= result["ci_high"] <= 1
    # The interval ignores the order of the values (devices gather them in any order).
    assert bootstrap_ci(torch.tensor([1.0, 0.0, 0.5, 1.0])) == bootstrap_ci(torch.tensor([0.5, 1.0, 1.0, 0.0]))


class FakeJudgeHandler(BaseHTTPRequestHandler):
    """Prefers whichever response contains GOOD; records the position it was in and the auth header."""

    seen: list = []

    def _reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._reply({"data": [{"id": "fake-gpt"}]})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = request["messages"][0]["content"]
        a_part = content.split("Response A:")[1].split("Response B:")[0]
        winner = "A" if "GOOD" in a_part else "B"
        FakeJudgeHandler.seen.append((winner, self.headers.get("Authorization")))
        self._reply({"choices": [{"message": {"content": f"Comparison: one is better.\nMore helpful: {winner}"}}]})

    def log_message(self, *args):
        pass


def test_chat_completions_judge_randomises_order_against_a_local_server(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), FakeJudgeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    FakeJudgeHandler.seen = []
    try:
        judge = ChatCompletionsJudge(f"http://127.0.0.1:{server.server_port}/v1", "fake-gpt", seed=1)
        judge.check_reachable()
        outcomes = judge.compare(["\n\nHuman: q?\n\nAssistant:"] * 12, ["GOOD answer"] * 12, ["bad answer"] * 12)
    finally:
        server.shutdown()
    assert outcomes.tolist() == [1.0] * 12
    positions = {winner for winner, _ in FakeJudgeHandler.seen}
    assert positions == {"A", "B"}  # the policy was shown in both positions
    assert all(auth == "Bearer sk-test-secret" for _, auth in FakeJudgeHandler.seen)
    assert "sk-test-secret" not in json.dumps(judge.describe())


def test_unreachable_judge_fails_before_any_generation(workdir, hh_path, monkeypatch, capsys):
    monkeypatch.setattr(bench.evaluation.evaluate, "sample", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(SystemExit):
        main(["eval", "tiny", "--recipe", "tiny", f"--data-path={hh_path}", "--judge", "http://127.0.0.1:9/v1",
              "--proxy", "none"])
    assert "judge endpoint http://127.0.0.1:9/v1 is unreachable" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "0123456789abcdef0123456789abcdef", "--recipe", "tiny"], "no MLflow run '0123456789abcdef"),
        (["eval", "tiny", "--recipe", "tiny", "--n-prompts", "100000"], "is larger than the test split"),
    ],
)
def test_bad_eval_input(workdir, hh_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        main([*argv, f"--data-path={hh_path}"])
    assert message in capsys.readouterr().err


def test_a_reward_model_is_not_a_policy(workdir, hh_path, capsys):
    main(["train", "rm", "--recipe", "tiny", f"--data.path={hh_path}", "--trainer.max_steps=1",
          "--trainer.limit_val_batches=0", "--model.role=judge"])
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["eval", run.data.tags["output_path"], "--recipe", "tiny", f"--data-path={hh_path}"])
    assert "is not a policy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", run.info.run_id, "--recipe", "tiny"])
    assert "trained a reward model (judge), not a policy" in capsys.readouterr().err


def test_length_sorted_sampling_returns_each_prompts_own_response():
    from bench.core.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm("tiny"), load_tokenizer("tiny")
    prompts = [list(range(5, 5 + n)) for n in (9, 3, 14, 6, 11)]
    greedy = bench.sampling.generation.Sampling(temperature=0, max_new_tokens=6, batch_size=2)
    batched = bench.sampling.generation.sample(model, tokenizer, prompts, greedy, desc="batched")
    alone = [bench.sampling.generation.sample(model, tokenizer, [p], greedy, desc="alone")[0] for p in prompts]
    assert batched == alone


@pytest.fixture
def judge_registry(monkeypatch):
    """The judge registry, restored after the test: judges a test defines register in a copy."""
    registry = dict(JUDGES)
    monkeypatch.setattr(bench.evaluation.judges, "JUDGES", registry)
    return registry


def test_a_judge_registers_by_naming_its_kind_and_make_judge_picks_it(judge_registry):
    class LongerWins(ScoringJudge):
        kind = "test-longer"

        @classmethod
        def accepts(cls, spec):
            return spec.startswith("longer:")

        def scores(self, prompts, responses):
            return torch.tensor([float(len(r)) for r in responses])

    class Unregistered(LongerWins):  # inherits the kind: not a second judge of it
        pass

    assert judge_registry["test-longer"] is LongerWins and Unregistered not in judge_registry.values()
    # registered after the reward-model judge, which accepts any spec, yet asked before it: it is the fallback
    judge = make_judge(EvalSettings(judge="longer:chars"), "tiny")
    assert type(judge) is LongerWins and judge.describe() == {"kind": "test-longer", "path": "longer:chars"}
    judge.check_reachable()
    outcomes = judge.compare(["q"] * 3, ["a long answer", "no", "same"], ["short", "longer", "same"])
    assert outcomes.tolist() == [1.0, 0.0, 0.5]
    assert type(make_judge(EvalSettings(judge="reward:vader"), "tiny")) is RewardJudge  # the others still answer


def test_the_registry_refuses_a_second_judge_of_a_kind_and_one_that_accepts_nothing(judge_registry):
    with pytest.raises(TypeError, match="judge kind 'reward' is taken by bench.evaluation.judges.RewardJudge"):
        class AnotherReward(Judge):
            kind = "reward"

            @classmethod
            def accepts(cls, spec):
                return False

    with pytest.raises(TypeError, match="needs an `accepts"):
        class Speechless(Judge):
            kind = "test-speechless"

    assert judge_registry["reward"] is RewardJudge and "test-speechless" not in judge_registry
    del judge_registry["reward_model"]  # without the fallback, a spec nothing accepts is named in one line
    with pytest.raises(ConfigError, match="eval.judge 'some/folder' names no judge; known kinds: reward, chat_"):
        judge_class("some/folder")


def test_each_shipped_spec_kind_maps_to_its_judge(reward_models, tmp_path, monkeypatch):
    assert isinstance(make_judge(EvalSettings(judge="reward:vader"), "tiny"), RewardJudge)
    with pytest.raises(ConfigError, match="judge 'reward:nope' names no registered computable reward"):
        make_judge(EvalSettings(judge="reward:nope"), "tiny")

    for url in ("http://127.0.0.1:9/v1", "https://example.org/v1"):
        judge = make_judge(EvalSettings(judge=url, judge_model="fake-gpt"), "tiny")
        assert type(judge) is ChatCompletionsJudge
        assert judge.describe() == {"kind": "chat_completions", "url": url, "model": "fake-gpt"}
    template = tmp_path / "judge.txt"
    template.write_text("Which is better for {query}? A: {response_a} B: {response_b}")
    judge = make_judge(EvalSettings(judge="http://127.0.0.1:9/v1", judge_prompt=str(template)), "tiny")
    assert judge.prompt_template == template.read_text()
    template.write_text("Which is better? A: {response_a}")
    with pytest.raises(ConfigError, match=r"lacks the fields \['\{query\}', '\{response_b\}'\]"):
        make_judge(EvalSettings(judge="http://127.0.0.1:9/v1", judge_prompt=str(template)), "tiny")
    with pytest.raises(ConfigError, match="eval.judge_prompt .*missing.txt"):
        make_judge(EvalSettings(judge="http://127.0.0.1:9/v1", judge_prompt=str(tmp_path / "missing.txt")), "tiny")

    judge = make_judge(EvalSettings(judge=reward_models["judge"]), "tiny")
    assert type(judge) is RewardModelJudge and judge.path == reward_models["judge"]
    assert judge.trained_role == "judge"
    with pytest.raises(ConfigError, match="was trained as the proxy"):
        make_judge(EvalSettings(judge=reward_models["proxy"]), "tiny")
    asked = []
    monkeypatch.setattr(bench.runs.tracking, "find_reward_model",
                        lambda experiment, role: asked.append((experiment, role)) or reward_models["judge"])
    judge = make_judge(EvalSettings(judge="latest"), "tiny")
    assert type(judge) is RewardModelJudge and judge.path == reward_models["judge"]
    assert asked == [("tiny", "judge")]
