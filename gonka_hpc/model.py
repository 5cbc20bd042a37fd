"""The network's local model, built from nothing, identified by its content hash.

No model hub is reachable, so the project makes its own: a deterministic corpus of structured
text (templated sentences, counting, key=value lists, small sums, chat turns), a byte-level BPE
tokenizer trained on it, and a small Llama trained on it for about a minute so that it is
confident (a randomly initialized model is near uniform, which would make verification tests
meaningless). Two specs: `gonka-tiny`, the network model, and `gonka-tiny-small`, a cheaper
substitute on the same tokenizer and data (what a cheater would run).

Identity: `content_hash(dir)` is sha256 over the canonical list of (relative file name, sha256 of
its bytes) of every file but the marker. The build is bit-identical run to run on one machine
kind (fixed seeds, fixed thread count, fixed data order, safetensors, no version strings in the
JSON files). Limits: another torch version or CPU kind may round differently and so yield
another hash; a real network would ship the model dir, not rebuild it.

`ensure_model` builds into `data_dir()/models/<name>/` once (temp dir, marker written last,
rename) and afterwards only re-checks the hash. Everything loads from local paths only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from .canonical import canonical_bytes, sha256_hex
from .config import data_dir as default_data_dir
from .errors import GonkaError

MARKER = "gonka-model.json"
BUILD_VERSION = 1
TRAIN_THREADS = 2
"""Threads used while training: fixed, because the thread count changes float reductions."""

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, USER, ASSISTANT, SYSTEM]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] | trim + ' ' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""Role markers and content; `add_generation_prompt` opens an assistant turn."""


# --- specs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and training schedule of one named model."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    train_steps: int
    """AdamW steps; the build time is about proportional to it."""
    batch_size: int = 16
    seq_len: int = 128
    """Tokens per training window (windows are cut from the packed corpus stream)."""
    lr: float = 3e-3
    """Peak learning rate (linear warmup, cosine decay to 5%)."""
    vocab_size: int = 2048
    """BPE target; the corpus yields about 2,000 tokens (the config takes the real count)."""
    max_position_embeddings: int = 512
    seed: int = 1234
    """Seeds the corpus, the initialization and the data order."""
    corpus_docs: int = 30_000


MODEL_SPECS: dict[str, ModelSpec] = {
    "gonka-tiny": ModelSpec(hidden_size=192, intermediate_size=512, num_layers=4, num_heads=4,
                            train_steps=240),
    "gonka-tiny-small": ModelSpec(hidden_size=128, intermediate_size=320, num_layers=2,
                                  num_heads=4, train_steps=300),
}
"""The network model (2.2M parameters, about 65-75 s to build on 2 cores, mean entropy about
1.6 nats) and the cheater's cheaper substitute (same tokenizer and data, half the per-token
cost; trained for more, cheaper, steps it is about as good: the hard case for verification)."""

TOKENIZER_SPEC = "gonka-tiny"
"""Both models share the tokenizer trained for this spec's corpus."""


@dataclass(frozen=True)
class ModelInfo:
    """A built, hash-checked model directory."""

    name: str
    path: Path
    content_hash: str


# --- corpus ---------------------------------------------------------------------------------

_NOUNS = {"dog": "barks", "cat": "sleeps", "bird": "sings", "fox": "runs", "fish": "swims",
          "horse": "jumps", "cow": "eats", "bee": "flies", "wolf": "howls", "owl": "hoots",
          "duck": "quacks", "frog": "croaks", "lion": "roars", "snake": "hisses",
          "mouse": "squeaks", "sheep": "bleats", "goat": "climbs", "rabbit": "hops",
          "turtle": "crawls", "eagle": "soars", "dolphin": "dives", "squirrel": "gathers",
          "elephant": "trumpets", "monkey": "chatters", "penguin": "waddles",
          "kangaroo": "bounces", "giraffe": "browses", "hedgehog": "snuffles",
          "butterfly": "flutters", "crocodile": "lurks", "parrot": "whistles",
          "camel": "wanders"}
_ADJS = ["red", "big", "small", "old", "young", "happy", "brown", "quick", "sleepy", "gentle",
         "clever", "curious", "noisy", "quiet", "tiny", "enormous", "friendly", "grumpy",
         "spotted", "striped", "golden", "silver", "hungry", "lazy"]
_PLACES = ["in the park", "by the river", "on the hill", "near the house", "under the tree",
           "across the meadow", "through the forest", "along the beach", "inside the barn",
           "beyond the mountains", "around the village", "beside the waterfall"]
_TIMES = ["every day", "at night", "in the morning", "after lunch", "before sunrise",
          "during the winter", "throughout the afternoon", "whenever it rains"]
_KEYS = ["name", "color", "size", "city", "level", "country", "planet", "instrument"]
_VALUES = {"name": ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
                    "ivan", "judy", "mallory", "oscar", "peggy", "trent", "victor", "walter"],
           "color": ["red", "green", "blue", "black", "white", "yellow", "purple", "orange"],
           "size": ["small", "medium", "large", "enormous"],
           "city": ["paris", "rome", "berlin", "oslo", "madrid", "vienna", "lisbon", "prague",
                    "dublin", "helsinki", "amsterdam", "copenhagen", "stockholm", "warsaw"],
           "level": [str(i) for i in range(1, 10)],
           "country": ["france", "italy", "germany", "norway", "spain", "austria", "portugal",
                       "ireland", "finland", "netherlands", "denmark", "sweden", "poland"],
           "planet": ["mercury", "venus", "earth", "mars", "jupiter", "saturn", "uranus",
                      "neptune"],
           "instrument": ["piano", "violin", "trumpet", "guitar", "clarinet", "saxophone",
                          "harmonica", "xylophone", "accordion", "tambourine"]}
_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
          "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
          "eighteen", "nineteen", "twenty"]
_MAX_COUNT = 999


def _sentence(rng: random.Random) -> str:
    noun = rng.choice(list(_NOUNS))
    adj = rng.choice(_ADJS)
    kind = rng.randrange(3)
    if kind == 0:
        return f"the {adj} {noun} {_NOUNS[noun]} {rng.choice(_PLACES)} ."
    if kind == 1:
        return f"the {noun} is {adj} and it {_NOUNS[noun]} {rng.choice(_TIMES)} ."
    return f"a {adj} {noun} {_NOUNS[noun]} {rng.choice(_PLACES)} {rng.choice(_TIMES)} ."


def _story(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(2, 4)))


def _counting(rng: random.Random) -> tuple[str, str]:
    start = rng.randint(0, _MAX_COUNT)
    stop = start + rng.randint(4, 16)
    return f"count from {start} to {stop}", " ".join(str(i) for i in range(start, stop + 1))


def _words(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(3, len(_WORDS))
    return f"count to {_WORDS[n - 1]} in words", " ".join(_WORDS[:n])


def _sum(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"what is {a} plus {b} ?", f"{a} plus {b} is {a + b} ."


def _keyvalue(rng: random.Random) -> tuple[str, str]:
    keys = _KEYS[: rng.randint(2, 5)] if rng.random() < 0.5 else _KEYS[3:]
    return "list the settings", " ; ".join(f"{k}={rng.choice(_VALUES[k])}" for k in keys) + " ;"


def _describe(rng: random.Random) -> tuple[str, str]:
    noun = rng.choice(list(_NOUNS))
    adj = rng.choice(_ADJS)
    return (f"tell me about the {noun}",
            f"the {noun} is {adj} . the {noun} {_NOUNS[noun]} {rng.choice(_PLACES)} .")


def _repeat(rng: random.Random) -> tuple[str, str]:
    phrase = f"the {rng.choice(_ADJS)} {rng.choice(list(_NOUNS))}"
    return f"repeat {phrase}", f"{phrase} . {phrase} ."


_TASKS: list[Callable[[random.Random], tuple[str, str]]] = [
    _counting, _words, _sum, _keyvalue, _describe, _repeat]


def _chat(rng: random.Random) -> str:
    turns = []
    if rng.random() < 0.2:
        turns.append(f"{SYSTEM} you are a helpful assistant . ")
    for _ in range(rng.randint(1, 2)):
        if rng.random() < 0.15:
            prompt, answer = "tell me a story", _story(rng)
        else:
            prompt, answer = rng.choice(_TASKS)(rng)
        turns.append(f"{USER} {prompt} {ASSISTANT} {answer} {EOS}")
    return "".join(turns)  # the chat template's exact layout


def _document(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.5:
        return _chat(rng)
    if kind < 0.75:
        return _story(rng)
    prompt, answer = rng.choice(_TASKS)(rng)
    return f"{prompt} : {answer}"


def corpus(n_docs: int, seed: int = 0) -> list[str]:
    """`n_docs` documents of structured text, a pure function of (n_docs, seed)."""
    rng = random.Random(seed)
    return [_document(rng) for _ in range(n_docs)]


def heldout_texts(n: int) -> list[str]:
    """Documents from the same generator under a seed training never uses."""
    return corpus(n, seed=987_654_321)


# --- tokenizer ------------------------------------------------------------------------------


def build_tokenizer(texts: list[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    """Byte-level BPE trained on `texts`, wrapped for transformers, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD,
                                   additional_special_tokens=[USER, ASSISTANT, SYSTEM])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.append(bos)
        ids.extend(enc)
        if not enc or enc[-1] != eos:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


# --- training -------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence transformers' own progress bars (loading, writing shards); restore afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _torch_state(threads: int) -> Iterator[None]:
    """Fix thread count and deterministic algorithms; restore both afterwards."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


def _llama_config(spec: ModelSpec, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _train(spec: ModelSpec, tokenizer, stream: torch.Tensor, progress: bool):
    from transformers import LlamaForCausalLM

    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(_llama_config(spec, tokenizer))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95),
                            weight_decay=0.01)
    warmup = max(1, spec.train_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, spec.train_steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    span = spec.seq_len + 1
    n_windows = (stream.numel() - 1) // spec.seq_len
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(spec.seed))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=spec.train_steps, desc="training model", unit="step", file=sys.stderr,
                   leave=False, mininterval=0.1 if sys.stderr.isatty() else 15)
    try:
        for step in range(spec.train_steps):
            idx = order[(torch.arange(spec.batch_size) + step * spec.batch_size) % n_windows]
            batch = torch.stack([stream[i * spec.seq_len: i * spec.seq_len + span]
                                 for i in idx.tolist()])
            logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return model


def _strip_versions(path: Path) -> None:
    """Drop library version strings from saved JSON so the identity is the model's alone."""
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        f = path / name
        if f.exists():
            data = json.loads(f.read_text())
            data.pop("transformers_version", None)
            f.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_model(name: str, out_dir: Path, progress: bool = True) -> None:
    """Build model `name` from nothing into the (existing, empty) directory `out_dir`."""
    spec = _spec(name)
    tok_spec = MODEL_SPECS[TOKENIZER_SPEC]
    texts = corpus(tok_spec.corpus_docs, seed=tok_spec.seed)
    tokenizer = build_tokenizer(texts, tok_spec.vocab_size)
    stream = _token_stream(tokenizer, texts)
    with _torch_state(TRAIN_THREADS):
        model = _train(spec, tokenizer, stream, progress)
    model.generation_config.do_sample = False
    with quiet_hf():
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    _strip_versions(out_dir)


# --- identity and cache ---------------------------------------------------------------------


def _spec(name: str) -> ModelSpec:
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise GonkaError(f"unknown model '{name}'; known: {sorted(MODEL_SPECS)}") from None


def content_hash(path: Path) -> str:
    """sha256 over the canonical list of (relative file name, sha256 of bytes), marker excluded."""
    path = Path(path)
    entries = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel == MARKER:
            continue
        entries.append([rel, sha256_hex(f.read_bytes())])
    if not entries:
        raise GonkaError(f"model directory {path} holds no files")
    return sha256_hex(canonical_bytes({"v": 1, "files": entries}))


def _models_root(data_dir: Path | None) -> Path:
    return Path(data_dir if data_dir is not None else default_data_dir()) / "models"


def recipe_hash(name: str) -> str:
    """Hash of everything that determines a build: its spec, the tokenizer's, the build version."""
    spec = dataclasses.asdict(_spec(name))
    tok = dataclasses.asdict(MODEL_SPECS[TOKENIZER_SPEC])
    return sha256_hex(canonical_bytes({"v": BUILD_VERSION, "spec": spec, "tokenizer": tok,
                                       "threads": TRAIN_THREADS}))


def _load_marker(name: str, path: Path) -> ModelInfo:
    marker = path / MARKER
    if not marker.exists():
        raise GonkaError(f"{path} exists but holds no {MARKER} (an incomplete or foreign "
                         f"model directory); delete it and run again to rebuild '{name}'")
    recorded = json.loads(marker.read_text())
    actual = content_hash(path)
    if recorded.get("name") != name or recorded.get("content_hash") != actual:
        raise GonkaError(f"model '{name}' in {path} does not match its marker (recorded hash "
                         f"{recorded.get('content_hash')}, files hash to {actual}); delete the "
                         f"directory and run again to rebuild it")
    if recorded.get("recipe") != recipe_hash(name):
        raise GonkaError(f"model '{name}' in {path} was built by another recipe (an older "
                         f"gonka-hpc?); delete the directory and run again to rebuild it")
    return ModelInfo(name=name, path=path, content_hash=actual)


def _build_into(name: str, target: Path, progress: bool) -> ModelInfo:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".build", dir=target.parent))
    try:
        t0 = time.monotonic()
        if progress:
            print(f"building model '{name}' into {target} (about a minute)", file=sys.stderr)
        build_model(name, tmp, progress=progress)
        digest = content_hash(tmp)
        marker = {"name": name, "content_hash": digest, "recipe": recipe_hash(name)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model dir is shared read-only
        try:
            os.rename(tmp, target)
        except OSError:
            if (target / MARKER).exists():  # another process won the race: use its build
                return _load_marker(name, target)
            raise
        if progress:
            print(f"built '{name}' in {time.monotonic() - t0:.1f} s: {digest}", file=sys.stderr)
        return ModelInfo(name=name, path=target, content_hash=digest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_model(name: str, data_dir: Path | None = None, progress: bool = True) -> ModelInfo:
    """The model `name`, built into `<data_dir>/models/<name>/` on first use, hash-checked after."""
    _spec(name)
    target = _models_root(data_dir) / name
    if target.exists():
        return _load_marker(name, target)
    return _build_into(name, target, progress)


def create_model(name: str, data_dir: Path | None = None, force: bool = False,
                 progress: bool = True) -> ModelInfo:
    """Build model `name`; an existing build is checked and kept unless `force` rebuilds it."""
    _spec(name)
    target = _models_root(data_dir) / name
    if target.exists() and force:
        shutil.rmtree(target)
    return ensure_model(name, data_dir, progress)


# --- quality --------------------------------------------------------------------------------


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local directory only, model in eval mode."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model_dir = Path(model_dir)
    with quiet_hf():
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = LlamaForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    model.eval()
    return model, tokenizer


def mean_next_token_entropy(model_dir: Path, texts: list[str]) -> float:
    """Mean entropy (nats) of the model's next-token distribution over every position of `texts`."""
    model, tokenizer = load_model(model_dir)
    total, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, dim=-1)
            ent = -(lp.exp() * lp).sum(dim=-1)
            total += float(ent.sum())
            count += ent.numel()
    return total / max(count, 1)
