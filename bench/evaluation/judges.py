"""Judges decide, per prompt, whether the policy's response beats a baseline's.

- `RewardModelJudge` (the default): a trained reward model's scores; also gives mean scores.
- `RewardJudge`: a computable reward of the response text (`reward:NAME`, `bench.evaluation.rewards`), e.g. the VADER
  sentiment gold of the controlled-sentiment world; also gives mean scores.
- `ChatCompletionsJudge`: pairwise verdicts from an OpenAI-compatible chat-completions endpoint, as in
  the GPT-4-judged win rates of the DPO and KTO papers. The order of the two responses is randomised.
"""

import json
import logging
import os
import random
import re
import urllib.error
import urllib.request

import torch
from tqdm.auto import tqdm

from bench.core.errors import BenchError
from bench.evaluation.rewards import is_reward_spec, make_reward
from bench.sampling.generation import model_fingerprint
from modules.metrics import win_outcomes
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


class ScoringJudge:
    """A judge that scores each response on its own: the higher score wins, a tie counts one half. A subclass
    gives `scores`; being local, it is always reachable."""

    def check_reachable(self) -> None:
        pass

    def scores(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def compare(self, prompts, policy_responses, baseline_responses) -> torch.Tensor:
        return win_outcomes(self.scores(prompts, policy_responses), self.scores(prompts, baseline_responses))


class RewardModelJudge(ScoringJudge):
    kind = "reward_model"

    def __init__(self, path: str, role: str = "judge", input_format: str = "auto"):
        self.path, self.module = path, load_reward_model(path, role, input_format)
        self.trained_role = self.module.trained_role

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


class ChatCompletionsJudge:
    """Pairwise judge over an OpenAI-compatible API. The key is read from `api_key_env` and never logged."""

    kind = "chat_completions"

    def __init__(self, base_url: str, model: str, prompt_template: str = DPO_HELPFULNESS_PROMPT,
                 api_key_env: str = "OPENAI_API_KEY", seed: int = 0, timeout: float = 60.0):
        self.base_url, self.model, self.prompt_template = base_url.rstrip("/"), model, prompt_template
        self.api_key_env, self.seed, self.timeout = api_key_env, seed, timeout

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

    def scores(self, prompts, responses):
        return None  # pairwise only

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
