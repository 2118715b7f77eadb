"""Judges decide, per prompt, whether the policy's response beats a baseline's.

A judge is a subclass of `Judge` with a `kind`; naming the kind registers it (`JUDGES`), as a computable reward
registers by its `name` (`bench.evaluation.rewards`). `eval.judge` is a spec, and `judge_class(spec)` picks the
first registered judge whose `accepts(spec)` says yes, in the order they registered, with the fallback judges
(`fallback = True`: the reward-model judge, which takes any folder, hub id or "latest") asked last; its
`from_settings(spec, settings, experiment)` builds it. A judge that scores each response alone subclasses
`ScoringJudge` and gives `scores` only:

    class LengthJudge(ScoringJudge):
        kind = "length"

        @classmethod
        def accepts(cls, spec):
            return spec == "length"

        def scores(self, prompts, responses):
            return torch.tensor([float(len(r)) for r in responses])

Shipped, in the order they are asked (the first two take disjoint specs):
- `RewardJudge` (`reward:NAME`): a computable reward of the response text (`bench.evaluation.rewards`), e.g. the
  VADER sentiment gold of the controlled-sentiment world; also gives mean scores.
- `ChatCompletionsJudge` (`http(s)://…`): pairwise verdicts from an OpenAI-compatible chat-completions endpoint,
  as in the GPT-4-judged win rates of the DPO and KTO papers. The order of the two responses is randomised.
- `RewardModelJudge` (the fallback: a reward-model folder, a hub id, or "latest", the experiment's newest judge
  reward model): a trained reward model's scores; also gives mean scores.
"""

import json
import logging
import os
import random
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from bench.core.errors import BenchError, ConfigError
from bench.core.registries import register
from bench.evaluation.metrics import win_outcomes
from bench.evaluation.rewards import is_reward_spec, make_reward
from bench.runs import tracking
from bench.sampling.generation import model_fingerprint
from modules.reward_model import load_reward_model

log = logging.getLogger(__name__)

# The DPO paper's GPT-4 prompt for single-turn dialogue (Rafailov et al. 2023, Appendix C.2).
DPO_HELPFULNESS_PROMPT = """For the following query to a chatbot, which response is more helpful?

Query: {query}

Response A:
{response_a}

Response B:
{response_b}

FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. \
SECOND, on a new line, state only "A" or "B" to indicate which response is more helpful. Your response \
should use the format:
Comparison: <one-sentence comparison and explanation>
More helpful: <"A" or "B">"""

VERDICT = re.compile(r'More helpful:\s*"?\s*([AB])\b', re.IGNORECASE)

JUDGES: dict[str, type["Judge"]] = {}  # kind -> class, in the order they registered


class Judge:
    """What `bench eval` asks of a judge. A subclass that sets its own `kind` registers in `JUDGES` (a subclass
    that inherits its parent's kind does not); it must say which specs it `accepts`, and two classes of one kind
    are refused."""

    kind: ClassVar[str] = ""
    fallback: ClassVar[bool] = False  # asked after every other judge: it accepts what no other one does

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if not kind:
            return
        if cls.accepts.__func__ is Judge.accepts.__func__:
            raise TypeError(f"judge {cls.__qualname__} (kind {kind!r}) needs an `accepts(spec)` classmethod")
        register(JUDGES, cls, "kind", "judge kind")

    def __init__(self, spec: str):
        self.path = spec  # what tables and tags name the judge by

    @classmethod
    def accepts(cls, spec: str) -> bool:
        """Whether `eval.judge: spec` names a judge of this kind."""
        raise NotImplementedError

    @classmethod
    def from_settings(cls, spec: str, settings, experiment: str) -> "Judge":
        """The judge `spec` names, built with the eval settings (`bench.evaluation.evaluate.EvalSettings`) of a
        run in `experiment` (by default `cls(spec)`); raises `ConfigError` (one line) on bad input, before
        anything is generated."""
        return cls(spec)

    def check_reachable(self) -> None:
        """Raises `BenchError` when the judge cannot answer (a remote one); local judges always can."""

    def compare(self, prompts: list[str], policy_responses: list[str], baseline_responses: list[str]) -> torch.Tensor:
        """Per prompt, 1 when the policy's response wins, 0.5 for a tie, 0 when the baseline's does."""
        raise NotImplementedError

    def scores(self, prompts: list[str], responses: list[str]) -> torch.Tensor | None:
        """Each response's score; None for a judge that only compares."""
        return None

    def describe(self) -> dict[str, str]:
        """The tags a run records about its judge (`eval.judge.<key>`; tables name it by `path`); never a secret."""
        return {"kind": self.kind, "path": self.path}


def judge_class(spec: str) -> type[Judge]:
    """The registered judge for `eval.judge: spec`: the first to accept it, fallbacks last."""
    for cls in sorted(JUDGES.values(), key=lambda c: c.fallback):  # stable: registration order otherwise
        if cls.accepts(spec):
            return cls
    raise ConfigError(f"eval.judge {spec!r} names no judge; known kinds: {', '.join(JUDGES)}")


class ScoringJudge(Judge):
    """A judge that scores each response on its own: the higher score wins, a tie counts one half. A subclass
    gives `scores`; being local, it is always reachable."""

    def scores(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def compare(self, prompts, policy_responses, baseline_responses) -> torch.Tensor:
        return win_outcomes(self.scores(prompts, policy_responses), self.scores(prompts, baseline_responses))


class RewardModelJudge(ScoringJudge):
    """A trained reward model's scores (a folder or a hub id; "latest": the experiment's newest judge reward
    model). The fallback: asked last, it accepts any spec."""

    kind = "reward_model"
    fallback = True

    def __init__(self, path: str, role: str = "judge", input_format: str = "auto"):
        self.path, self.module = path, load_reward_model(path, role, input_format)
        self.trained_role = self.module.trained_role

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return True

    @classmethod
    def from_settings(cls, spec: str, settings, experiment: str) -> "RewardModelJudge":
        path = tracking.find_reward_model(experiment, "judge") if spec == "latest" else spec
        judge = cls(path, role="judge", input_format=settings.judge_format)
        if judge.trained_role == "proxy":
            raise ConfigError(f"judge {path} was trained as the proxy; train a judge, or a `shared` model on purpose")
        return judge

    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "trained_role": self.trained_role,
                "input_format": self.module.input_format, "fingerprint": model_fingerprint(self.path)}

    def scores(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return self.module.score(prompts, responses)


class RewardJudge(ScoringJudge):
    """A computable reward as the judge: the higher-scoring response wins, ties count one half."""

    kind = "reward"

    def __init__(self, spec: str):
        self.reward = make_reward(spec, field="judge")
        self.path = self.reward.spec  # what tables and tags name the judge by
        self.trained_role = "gold"

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return is_reward_spec(spec)

    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "description": self.reward.description,
                "fingerprint": self.reward.fingerprint()}

    def scores(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return self.reward.score(prompts, responses)


def load_scorer(spec: str, role: str, input_format: str = "auto"):
    """What scores responses for `spec`: a registered computable reward (`reward:NAME`) or a reward model
    (folder or hub id). Both have `score(prompts, responses)`."""
    return make_reward(spec, field=role) if is_reward_spec(spec) else load_reward_model(spec, role, input_format)


def scorer_fingerprint(spec: str) -> str:
    return make_reward(spec).fingerprint() if is_reward_spec(spec) else model_fingerprint(spec)


class ChatCompletionsJudge(Judge):
    """Pairwise judge over an OpenAI-compatible API. The key is read from `api_key_env` and never logged."""

    kind = "chat_completions"

    def __init__(self, base_url: str, model: str, prompt_template: str = DPO_HELPFULNESS_PROMPT,
                 api_key_env: str = "OPENAI_API_KEY", seed: int = 0, timeout: float = 60.0):
        self.base_url, self.model, self.prompt_template = base_url.rstrip("/"), model, prompt_template
        self.api_key_env, self.seed, self.timeout = api_key_env, seed, timeout

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return spec.startswith(("http://", "https://"))

    @classmethod
    def from_settings(cls, spec: str, settings, experiment: str) -> "ChatCompletionsJudge":
        """`settings.judge_model` at `spec`, with the prompt template of `settings.judge_prompt` (DPO's when
        unset), which must hold {query}, {response_a} and {response_b}."""
        template = DPO_HELPFULNESS_PROMPT
        if settings.judge_prompt:
            try:
                template = Path(settings.judge_prompt).read_text()
            except OSError as err:
                raise ConfigError(f"eval.judge_prompt {settings.judge_prompt}: {err}") from err
            missing = [f for f in ("{query}", "{response_a}", "{response_b}") if f not in template]
            if missing:
                raise ConfigError(f"eval.judge_prompt {settings.judge_prompt} lacks the fields {missing}")
        return cls(spec, settings.judge_model, template, seed=settings.sampling.seed)

    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "url": self.base_url, "model": self.model}

    def _request(self, path: str, payload: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def check_reachable(self) -> None:
        try:
            self._request("/models")
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as err:
            raise BenchError(f"judge endpoint {self.base_url} is unreachable ({err}); nothing was generated") from err

    def verdict(self, query: str, response_a: str, response_b: str) -> str | None:
        content = self.prompt_template.format(query=query, response_a=response_a, response_b=response_b)
        reply = self._request("/chat/completions", {
            "model": self.model, "temperature": 0, "messages": [{"role": "user", "content": content}],
        })
        match = VERDICT.search(reply["choices"][0]["message"]["content"])
        return match.group(1).upper() if match else None

    def compare(self, prompts, policy_responses, baseline_responses) -> torch.Tensor:
        rng = random.Random(self.seed)
        outcomes = []
        for prompt, policy, baseline in tqdm(list(zip(prompts, policy_responses, baseline_responses)),
                                             desc=f"judge {self.model}", unit="pair"):
            policy_first = rng.random() < 0.5
            a, b = (policy, baseline) if policy_first else (baseline, policy)
            verdict = self.verdict(prompt, a, b)
            if verdict is None:
                outcomes.append(0.5)  # unparsed: a tie, counted in the log
                log.warning("judge reply without a verdict for prompt %r; counted as a tie", prompt[:60])
            else:
                outcomes.append(1.0 if (verdict == "A") == policy_first else 0.0)
        return torch.tensor(outcomes, dtype=torch.float64)
