"""Computable rewards: a score of a response's text, with no model to train. A gold world (`gold.reward`) or a
judge (`eval.judge: reward:NAME`) can be one, beside reward models.

A reward is a subclass of `Reward` with a `name` and one method, `score_texts`; naming the class registers it:

    class Politeness(Reward):
        name = "politeness"

        def score_texts(self, prompts, responses):
            return [float("please" in r.lower()) for r in responses]

It is then `reward:politeness` wherever a judge or gold spec is read. Shipped: `vader`, the compound sentiment
score of VADER (Hutto & Gilbert 2014) in [-1, 1], whose lexicon ships in the `vadersentiment` package, so it
works offline: the gold of the controlled-sentiment world (the DPO paper's §6.1, where a sentiment classifier
is the gold); and `siebert-sentiment`, that classifier itself (`siebert/sentiment-roberta-large-english`, the
DPO paper's ground-truth reward, App. C.1): the log-odds of its positive class, read from the HF hub (or a
local copy of it), on the GPU when there is one. `HubSentimentClassifier` wraps any such hub classifier.
"""

import hashlib
import inspect
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from bench.core.errors import ConfigError, first_line
from bench.core.precision import inference_device
from bench.core.registries import register

PREFIX = "reward:"
REWARDS: dict[str, type["Reward"]] = {}


class Reward:
    """A reward of (prompt, response) texts. `score` is the interface judges and gold labels call."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_hub: ClassVar[bool] = False  # loads a model from the HF hub (a dry run swaps in a local reward)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register(REWARDS, cls, "name", "reward name")

    def score_texts(self, prompts: list[str], responses: list[str]) -> list[float]:
        raise NotImplementedError

    @property
    def spec(self) -> str:
        return PREFIX + self.name

    def fingerprint(self) -> str:
        """Changes when the reward's code does: caches keyed by it (gold labels) are then rebuilt."""
        return hashlib.sha256(inspect.getsource(type(self)).encode()).hexdigest()[:16]

    def score(self, prompts: list[str], responses: list[str], batch_size: int = 256, desc: str = "reward") -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        scores = []
        for start in tqdm(range(0, len(responses), batch_size), desc=f"{desc}: {self.name}", unit="batch",
                          disable=len(responses) <= batch_size, leave=False):
            scores += self.score_texts(prompts[start:start + batch_size], responses[start:start + batch_size])
        return torch.tensor(scores, dtype=torch.float32)


class VaderSentiment(Reward):
    """VADER's compound score of the response alone, in [-1, 1]: positive sentiment scores high."""

    name = "vader"
    description = "VADER compound sentiment of the response, in [-1, 1] (vaderSentiment 3.3.2)"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def score_texts(self, prompts, responses):
        return [self.analyzer.polarity_scores(response)["compound"] for response in responses]

    def fingerprint(self) -> str:
        lexicon = hashlib.sha256("".join(sorted(f"{k}{v}" for k, v in self.analyzer.lexicon.items())).encode())
        return f"{super().fingerprint()}-{lexicon.hexdigest()[:12]}"


class HubSentimentClassifier(Reward):
    """A pre-trained sequence classifier of sentiment (`model_id`: a hub id or a local folder) as a reward: each
    response is scored alone by the classifier's log-odds of its positive class, log p(positive) / (1 -
    p(positive)) = logit_positive - logsumexp(the other logits), which for a two-label model is
    logit_positive - logit_negative (a one-logit model's logit is taken as that log-odds). Unbounded, unlike a
    probability, so it still orders responses the classifier is sure of. `positive_label` names the positive
    class in the model's `id2label` (case aside). The model is loaded on the first `score` (so that a cache key
    or a dry run does not need it), onto the GPU when there is one, and scores in fp32 with autocast off (the
    same scores whichever caller's autocast is active), `micro_batch_size` responses a forward, each cut to
    `max_length` tokens. Subclass it with a `name` and a `model_id` to register another classifier."""

    needs_hub = True
    model_id: ClassVar[str] = ""
    revision: ClassVar[str | None] = None  # a hub commit or tag to pin; None: the hub's main branch
    positive_label: ClassVar[str] = "POSITIVE"
    max_length: ClassVar[int] = 512
    micro_batch_size: ClassVar[int] = 32

    def __init__(self):
        self.device = inference_device()
        self.model = self.tokenizer = None
        self.positive: int | None = None
        self.others: list[int] = []

    def load(self) -> None:
        """The tokenizer and classifier, once; one line naming the model when they cannot be loaded."""
        if self.model is not None:
            return
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        kwargs = {"revision": self.revision} if self.revision else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_id, **kwargs)
            model = AutoModelForSequenceClassification.from_pretrained(self.model_id, dtype=torch.float32, **kwargs)
        except (OSError, ValueError) as err:  # offline, not cached, no such model
            detail = first_line(err)[:200]
            raise ConfigError(f"{self.spec}: the sentiment classifier {self.model_id} could not be loaded ({detail}); "
                              f"it needs the HF hub or a local copy (`huggingface-cli download {self.model_id}` on a "
                              "machine with access fills the HF cache, HF_HOME)") from err
        self.positive, self.others = self.label_indices(model.config)
        self.tokenizer, self.model = tokenizer, model.to(self.device).eval()

    def label_indices(self, config) -> tuple[int, list[int]]:
        """(the positive class's logit index, the other classes' indices)."""
        if config.num_labels == 1:
            return 0, []
        labels = {int(i): str(label) for i, label in config.id2label.items()}
        positive = [i for i, label in labels.items() if label.lower() == self.positive_label.lower()]
        if len(positive) != 1:
            raise ConfigError(f"{self.spec}: the classifier {self.model_id} has no single {self.positive_label!r} "
                              f"label (its labels: {', '.join(labels.values())})")
        return positive[0], [i for i in sorted(labels) if i != positive[0]]

    @torch.no_grad()
    def log_odds(self, texts: list[str]) -> torch.Tensor:
        self.load()
        scores = []
        with torch.autocast(self.device.type, enabled=False):
            for start in range(0, len(texts), self.micro_batch_size):
                batch = self.tokenizer(texts[start:start + self.micro_batch_size], padding=True, truncation=True,
                                       max_length=min(self.max_length, self.tokenizer.model_max_length),
                                       return_tensors="pt").to(self.device)
                logits = self.model(**batch).logits.float()
                positive = logits[:, self.positive]
                scores.append(positive if not self.others else
                              positive - torch.logsumexp(logits[:, self.others], dim=1))
        return torch.cat(scores).cpu() if scores else torch.zeros(0)

    def score_texts(self, prompts, responses):
        return self.log_odds(list(responses)).tolist()

    def fingerprint(self) -> str:
        """The wrapping code's and the subclass's, and the model id (and pinned revision): no load needed."""
        code = inspect.getsource(HubSentimentClassifier) + inspect.getsource(type(self))
        return f"{hashlib.sha256(code.encode()).hexdigest()[:16]}-{self.model_id}@{self.revision or 'main'}"


class SiebertSentiment(HubSentimentClassifier):
    """The DPO paper's ground-truth reward in its controlled-sentiment world (Rafailov et al. 2023, App. C.1): the
    RoBERTa-large sentiment classifier of Hartmann et al. (2023), labels NEGATIVE and POSITIVE."""

    name = "siebert-sentiment"
    description = "log-odds of POSITIVE of siebert/sentiment-roberta-large-english (RoBERTa-large), per response"
    model_id = "siebert/sentiment-roberta-large-english"


def is_reward_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def reward_needs_hub(spec) -> bool:
    """Whether `spec` names a registered reward that loads a model from the HF hub (`reward:siebert-sentiment`)."""
    return is_reward_spec(spec) and getattr(REWARDS.get(spec.removeprefix(PREFIX)), "needs_hub", False)


def make_reward(spec: str, field: str = "reward") -> Reward:
    """The registered reward that `reward:NAME` (or a bare NAME) names; one line naming it when unknown."""
    name = spec.removeprefix(PREFIX)
    if name not in REWARDS:
        raise ConfigError(f"{field} {spec!r} names no registered computable reward; known: "
                          f"{', '.join(PREFIX + n for n in REWARDS)} (or give a reward-model folder)")  # shipped order
    return REWARDS[name]()
