"""Judges decide, per prompt, whether the policy's response beats a baseline's.

- `RewardModelJudge` (the default): a trained reward model's scores; also gives mean scores.
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
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from bench.errors import BenchError, ConfigError
from modules.metrics import win_outcomes

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


def check_reward_model(path: str, role: str) -> str:
    """The role a reward model was trained for here (`unknown` for an off-the-shelf one); an error naming the
    spec if it is not a sequence classifier with one output. Reads the config only (a local config.json, or
    the hub's), so it is cheap enough to check before anything else runs."""
    from bench.models import resolve
    from modules.reward_model import ROLE_KEY

    try:
        source = resolve(path)
    except BenchError as err:
        raise ConfigError(f"{role} reward model {path}: {err}") from err
    if Path(source).exists() and not (Path(source) / "config.json").exists():
        raise ConfigError(f"{role} reward model {path}: no config.json, so it is not a saved reward model")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{role} reward model {path} could not be read: {str(err).splitlines()[0]}") from err
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
        raise ConfigError(
            f"{role} reward model {path} is not a reward model: architectures {architectures}, "
            f"num_labels {config.num_labels} (expected a ...ForSequenceClassification with one output)"
        )
    return getattr(config, ROLE_KEY, "unknown")


def input_format_of(module, trained_role: str, requested: str = "auto") -> str:
    """How a reward model reads (prompt, response): as asked, else as it was trained here (`transcript`, or
    what its config.json records), else, for an off-the-shelf model, through its chat template when its
    tokenizer has one and as a text pair when not (OpenAssistant's DeBERTa reward models)."""
    from modules.reward_model import FORMAT_KEY

    if requested != "auto":
        return requested
    if trained_role != "unknown":
        return getattr(module.model.config, FORMAT_KEY, "transcript")
    return "chat" if module.tokenizer.chat_template is not None else "pair"


def load_reward_model(path: str, role: str, input_format: str = "auto"):
    """A RewardModel module around a reward model (a folder of this harness's, or any sequence classifier
    with one output: folder or hub id), checked to be one; `role` is the role it is used in, which its
    `used_as` records (the role it was trained for, if any, is `trained_role`)."""
    from bench.models import resolve
    from datamodules.formatting import RewardFormatter
    from modules.reward_model import MAX_LENGTH_KEY, RewardModel

    trained_role = check_reward_model(path, role)
    trained_length = getattr(AutoConfig.from_pretrained(resolve(str(path))), MAX_LENGTH_KEY, None)
    module = RewardModel(backbone=str(path), **({"max_length": trained_length} if trained_length else {}))
    module.configure_model()
    module.trained_role, module.used_as = trained_role, role
    module.input_format = input_format_of(module, trained_role, input_format)
    RewardFormatter(module.tokenizer, module.hparams.max_length, module.input_format)  # checks the format now
    return module


def check_proxy(path: str, allow_judge_as_proxy: bool = False) -> None:
    """PPO and RRHF optimise the proxy. Optimising the judge (or the gold model) would make the evaluation
    grade the policy with the model it was trained against, so they are refused unless asked for explicitly."""
    if path == "latest":
        raise ConfigError("proxy 'latest' means the newest proxy of the recipe's experiment, which `bench train` "
                          "resolves; outside it, pass a reward-model folder")
    trained_role = check_reward_model(path, "proxy")
    if trained_role in ("judge", "gold") and not allow_judge_as_proxy:
        raise ConfigError(
            f"proxy reward model {path} was trained as the {trained_role}; optimising it would make the evaluation "
            "grade itself. Pass a proxy, or set allow_judge_as_proxy=true to do this on purpose"
        )


def load_proxy(path: str, allow_judge_as_proxy: bool = False):
    check_proxy(path, allow_judge_as_proxy)
    return load_reward_model(path, role="proxy").requires_grad_(False)


class RewardModelJudge:
    kind = "reward_model"

    def __init__(self, path: str, role: str = "judge", input_format: str = "auto"):
        self.path, self.module = path, load_reward_model(path, role, input_format)
        self.trained_role = self.module.trained_role

    def describe(self) -> dict[str, str]:
        from bench.generation import model_fingerprint

        return {"kind": self.kind, "path": self.path, "trained_role": self.trained_role,
                "input_format": self.module.input_format, "fingerprint": model_fingerprint(self.path)}

    def check_reachable(self) -> None:
        pass

    def scores(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return self.module.score(prompts, responses)

    def compare(self, prompts, policy_responses, baseline_responses) -> torch.Tensor:
        return win_outcomes(self.scores(prompts, policy_responses), self.scores(prompts, baseline_responses))


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
