#!/usr/bin/env python3
"""Train `tessera-demo`: a small Qwen3-MoE language model of fortune cookies.

The result is the model Tessera embeds as its default: small enough to live in the repository
(bf16, well under 20 MB), but trained on real English text so that its output is readable, and
in exactly the layout of Qwen3-MoE checkpoints on the Hugging Face Hub, so that it exercises the
same loading path as a real model.

Run by hand (never in CI); the exact command used for the committed model is in README.md.
Needs the Debian packages `fortunes` and `fortunes-min` (the training text), and torch,
transformers 5.23.0, safetensors and tokenizers (all present in /opt/refenv).

Steps:

1. Reads every fortune file of the Debian packages, splits it into fortunes and holds out a
   fixed ~3% (chosen by a hash of the text, so the split does not depend on file order).
2. Trains a byte-level BPE tokenizer on the training fortunes.
3. Trains `Qwen3MoeForCausalLM` from scratch with AdamW and a cosine schedule, one CPU thread,
   fixed seeds and a deterministic data order.
4. Saves the model as bf16 safetensors with `save_pretrained`, checks the Hub tensor names,
   reloads it with `AutoModelForCausalLM.from_pretrained` (failing on any missing or unexpected
   key), measures the held-out loss of the *saved* weights and writes MODEL_CARD.md with
   samples.

`reference.py` (next to this file) then writes `reference.json` for Tessera's tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Single-threaded on purpose: the machine is shared, and one thread also makes every run
# bit-for-bit reproducible.  Must be set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen3MoeConfig  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
TRANSFORMERS_VERSION = "5.23.0"
FORTUNE_DIR = Path("/usr/share/games/fortunes")
DEBIAN_PACKAGES = ("fortunes", "fortunes-min")

# `ascii-art` holds drawings, not prose.  `ethnic` is jokes about nationalities: not what a
# project's default demo model should be repeating.  `off/` (the separately packaged
# "offensive" fortunes) is skipped wherever it appears.
EXCLUDED_FILES = {"ascii-art", "ethnic"}
HELD_OUT_PERCENT = 3

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A share of the training fortunes is wrapped in a one-turn ChatML conversation, so that the
# chat template (and a chat endpoint serving this model) produces a fortune and then <|im_end|>.
CHAT_PERCENT = 15
# Topic words for "Tell me a fortune about ..." requests; files not listed only get the
# topic-free requests.
TOPICS = {
    "art": "art",
    "computers": "computers",
    "debian": "Debian",
    "definitions": "definitions",
    "drugs": "drugs",
    "education": "education",
    "food": "food",
    "humorists": "humorists",
    "kids": "kids",
    "law": "the law",
    "linux": "Linux",
    "linuxcookie": "Linux",
    "literature": "literature",
    "love": "love",
    "magic": "magic",
    "medicine": "medicine",
    "men-women": "men and women",
    "news": "the news",
    "paradoxum": "paradoxes",
    "people": "people",
    "perl": "Perl",
    "pets": "pets",
    "platitudes": "platitudes",
    "politics": "politics",
    "riddles": "riddles",
    "science": "science",
    "songs-poems": "songs and poems",
    "sports": "sports",
    "startrek": "Star Trek",
    "tao": "the Tao",
    "wisdom": "wisdom",
    "work": "work",
    "zippy": "Zippy the Pinhead",
}
GENERIC_REQUESTS = ["Tell me a fortune.", "Give me a fortune cookie.", "Say something clever."]

# Prompts for the samples in MODEL_CARD.md.
SAMPLE_PROMPTS = [
    "The cat sat on the mat",
    "A fool and his money",
    "Q: What is the meaning of life?",
    "Computers are",
    EOS,  # "start a new fortune"
    f"{IM_START}user\nTell me a fortune about computers.{IM_END}\n{IM_START}assistant\n",
]
SAMPLE_NEW_TOKENS = 48


@dataclass
class Hyper:
    """Everything that determines the trained weights (recorded in MODEL_CARD.md)."""

    vocab_size: int = 4096
    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 48
    num_experts: int = 8
    experts_per_token: int = 2
    moe_intermediate_size: int = 192
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    weight_decay: float = 0.1
    router_aux_loss_coef: float = 0.01
    seed: int = 1234


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass
class Fortune:
    source: str  # file name inside FORTUNE_DIR
    text: str


def read_fortunes() -> list[Fortune]:
    """All fortunes, in a fixed order, without duplicates."""
    if not FORTUNE_DIR.is_dir():
        sys.exit(f"{FORTUNE_DIR} missing: apt-get install -y {' '.join(DEBIAN_PACKAGES)}")
    fortunes, seen = [], set()
    for path in sorted(FORTUNE_DIR.iterdir()):
        # Data files have no extension; `.dat` are strfile indexes and `.u8` symlinks to the data.
        if path.is_symlink() or not path.is_file() or "." in path.name or path.name in EXCLUDED_FILES:
            continue
        for chunk in path.read_text(encoding="utf-8").split("\n%\n"):
            text = "\n".join(line.rstrip() for line in chunk.strip("\n").split("\n")).strip("\n")
            if text == "%":
                text = ""
            if text and text not in seen:  # a duplicate could land in both splits
                seen.add(text)
                fortunes.append(Fortune(path.name, text))
    if (FORTUNE_DIR / "off").exists():
        print("note: skipping the offensive fortunes in off/")
    return fortunes


def stable_percent(text: str, salt: str) -> int:
    """A number in 0..99 that depends only on the text (not on file order or Python's hash seed)."""
    return int.from_bytes(hashlib.sha256((salt + text).encode()).digest()[:8], "little") % 100


def split(fortunes: list[Fortune]) -> tuple[list[Fortune], list[Fortune]]:
    held = [f for f in fortunes if stable_percent(f.text, "held-out") < HELD_OUT_PERCENT]
    train = [f for f in fortunes if stable_percent(f.text, "held-out") >= HELD_OUT_PERCENT]
    return train, held


def document(f: Fortune) -> str:
    """The training text of one fortune: plain, or (for a fixed share) as a chat answer."""
    if stable_percent(f.text, "chat") >= CHAT_PERCENT:
        return f.text
    requests = list(GENERIC_REQUESTS)
    if f.source in TOPICS:
        requests.append(f"Tell me a fortune about {TOPICS[f.source]}.")
    request = requests[stable_percent(f.text, "request") % len(requests)]
    return f"{IM_START}user\n{request}{IM_END}\n{IM_START}assistant\n{f.text}{IM_END}\n"


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def train_tokenizer(train: list[Fortune], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # Byte-level like GPT-2/Qwen: every string is encodable, decode(encode(s)) == s.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([f.text for f in train], trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size}")
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"{t} is not id {i}")
    return tok


def write_tokenizer(tok: Tokenizer, out: Path, seq_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": [IM_START, IM_END],
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": EOS,
            "errors": "replace",
            "model_max_length": seq_len,
            "pad_token": EOS,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    hf = AutoTokenizer.from_pretrained(out)
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    if chat != f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n":
        raise RuntimeError(f"chat template not picked up: {chat!r}")
    if (hf.eos_token_id, hf.pad_token_id) != (0, 0):
        raise RuntimeError(f"unexpected eos/pad ids {hf.eos_token_id}/{hf.pad_token_id}")


def encode_docs(tok: Tokenizer, docs: list[str]) -> list[list[int]]:
    """Token ids of every document, each followed by <|endoftext|> (documents are packed)."""
    return [e.ids + [0] for e in tok.encode_batch(docs, add_special_tokens=False)]


def windows(docs: list[list[int]], seq_len: int) -> torch.Tensor:
    """Concatenates the documents and cuts the stream into rows of seq_len tokens."""
    stream = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    rows = len(stream) // seq_len
    return stream[: rows * seq_len].view(rows, seq_len)


class Batches:
    """Deterministic batches: each epoch packs the documents in a fresh seeded order."""

    def __init__(self, docs: list[list[int]], hyper: Hyper):
        self.docs, self.hyper = docs, hyper
        self.epoch, self.rows, self.pos = -1, None, 0

    def next(self) -> torch.Tensor:
        b = self.hyper.batch_size
        if self.rows is None or self.pos + b > len(self.rows):
            self.epoch += 1
            gen = torch.Generator().manual_seed(self.hyper.seed * 1000 + self.epoch)
            order = torch.randperm(len(self.docs), generator=gen).tolist()
            self.rows, self.pos = windows([self.docs[i] for i in order], self.hyper.seq_len), 0
        batch = self.rows[self.pos : self.pos + b]
        self.pos += b
        return batch


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def make_config(h: Hyper) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=h.vocab_size,
        hidden_size=h.hidden_size,
        num_hidden_layers=h.num_layers,
        num_attention_heads=h.num_heads,
        num_key_value_heads=h.num_kv_heads,
        head_dim=h.head_dim,
        intermediate_size=4 * h.hidden_size,  # unused: every layer is MoE
        moe_intermediate_size=h.moe_intermediate_size,
        num_experts=h.num_experts,
        num_experts_per_tok=h.experts_per_token,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        tie_word_embeddings=True,
        max_position_embeddings=h.seq_len * 2,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        router_aux_loss_coef=h.router_aux_loss_coef,
        output_router_logits=False,  # switched on for training only
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )


def count_params(model: torch.nn.Module, h: Hyper) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    # Per token only top-k of the experts run.
    active = total - expert + expert * h.experts_per_token // h.num_experts
    return {"total": total, "experts": expert, "active_per_token": active}


def lr_at(step: int, h: Hyper) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < h.warmup_steps:
        return h.lr * (step + 1) / h.warmup_steps
    progress = (step - h.warmup_steps) / max(1, h.steps - h.warmup_steps)
    return h.lr * (h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, h: Hyper) -> torch.optim.Optimizer:
    # No weight decay on norms (1-D gains); everything else (embeddings, projections, experts,
    # routers) is decayed.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": h.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=h.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, rows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over all held-out rows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        logits = model(batch, output_router_logits=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return total / count


def train(
    model: torch.nn.Module, train_docs: list[list[int]], held_rows: torch.Tensor, h: Hyper, log, evaluate: bool = True
) -> dict:
    model.config.output_router_logits = True  # adds the load-balancing loss to outputs.loss
    opt = make_optimizer(model, h)
    batches = Batches(train_docs, h)
    start = time.monotonic()
    ce_sum, ce_n, history = 0.0, 0, []
    eval_every = max(1, h.steps // 8)
    for step in range(h.steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, h)
        batch = batches.next()
        out = model(batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ce_sum += (out.loss - h.router_aux_loss_coef * out.aux_loss).item()
        ce_n += 1
        if (step + 1) % 25 == 0 or step + 1 == h.steps:
            elapsed = time.monotonic() - start
            tps = (step + 1) * h.batch_size * h.seq_len / elapsed
            log(
                f"step {step + 1}/{h.steps} epoch {batches.epoch} train_ce {ce_sum / ce_n:.3f} "
                f"aux {out.aux_loss.item():.3f} lr {lr_at(step, h):.2e} {tps:.0f} tok/s "
                f"{elapsed / 60:.1f} min (eta {elapsed / (step + 1) * (h.steps - step - 1) / 60:.1f} min)"
            )
            ce_sum, ce_n = 0.0, 0
        if evaluate and ((step + 1) % eval_every == 0 or step + 1 == h.steps):
            loss = held_out_loss(model, held_rows)
            history.append((step + 1, loss))
            log(f"step {step + 1}: held-out loss {loss:.4f} (ppl {math.exp(loss):.1f})")
    model.config.output_router_logits = False
    return {
        "seconds": time.monotonic() - start,
        "epochs": batches.epoch + batches.pos / len(batches.rows),
        "history": history,
    }


# --------------------------------------------------------------------------------------------------
# Saving, checking, samples
# --------------------------------------------------------------------------------------------------


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save(model: torch.nn.Module, out: Path) -> None:
    model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    names = {}
    with safe_open(out / "model.safetensors", "pt") as f:
        for name in f.keys():
            names[name] = f.get_slice(name).get_dtype()
    # transformers 5 holds experts fused in memory; the Hub layout (and Tessera) wants one tensor
    # per expert, which save_pretrained is supposed to restore.  Fail loudly if it ever does not.
    fused = [n for n in names if "gate_up_proj" in n or n.endswith("experts.down_proj")]
    if fused:
        raise RuntimeError(f"fused expert tensors were written: {fused[:4]}")
    cfg = model.config
    want = [
        f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
        for layer in range(cfg.num_hidden_layers)
        for e in range(cfg.num_experts)
        for proj in ("gate_proj", "up_proj", "down_proj")
    ] + ["model.layers.0.mlp.gate.weight", "model.layers.0.self_attn.q_norm.weight", "model.embed_tokens.weight"]
    missing = [n for n in want if n not in names]
    if missing:
        raise RuntimeError(f"Hub tensor names missing: {missing[:6]}")
    if "lm_head.weight" in names:
        raise RuntimeError("tied embeddings, but lm_head.weight was stored")
    not_bf16 = {n: d for n, d in names.items() if d != "BF16"}
    if not_bf16:
        raise RuntimeError(f"tensors not stored as bf16: {not_bf16}")


def write_generation_config(out: Path) -> None:
    # Stop at the end of a fortune and at the end of a chat turn.  Sampling defaults suit the demo;
    # callers asking for temperature 0 still get greedy decoding.
    GenerationConfig(
        bos_token_id=None,
        eos_token_id=[0, 2],
        pad_token_id=0,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        top_k=0,
    ).save_pretrained(out)


def reload(out: Path) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"reloading {out} reported problems: {problems}")
    return model.eval()


@torch.no_grad()
def samples(model: torch.nn.Module, tokenizer, seed: int) -> list[dict]:
    out = []
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        mask = torch.ones_like(ids)
        greedy = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=SAMPLE_NEW_TOKENS)
        torch.manual_seed(seed + i)
        sampled = model.generate(ids, attention_mask=mask, max_new_tokens=SAMPLE_NEW_TOKENS)  # generation_config
        decode = lambda t: tokenizer.decode(t[0, ids.shape[1] :], skip_special_tokens=False)  # noqa: E731
        out.append({"prompt": prompt, "greedy": decode(greedy), "sampled": decode(sampled)})
    return out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (shared), 1 training thread, {platform.system()} {platform.machine()}"


def fence(text: str) -> str:
    return "```text\n" + text.replace("```", "'''") + "\n```"


def write_model_card(out: Path, info: dict) -> None:
    h = info["hyper"]
    p = info["params"]
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    lines = [
        "# tessera-demo",
        "",
        "A small Mixture-of-Experts language model that writes fortune cookies. It is Tessera's",
        "built-in demo model: small enough to ship in the repository, trained from scratch on real",
        "English text, and stored exactly like a Qwen3-MoE checkpoint on the Hugging Face Hub",
        "(`Qwen3MoeForCausalLM`, one safetensors tensor per expert), so `transformers` loads it as is.",
        "",
        "It is a toy: it makes up plausible-looking fortunes, jokes and quotations, and knows nothing.",
        "",
        "## Data",
        "",
        f"The fortune files of the Debian packages `{'` and `'.join(DEBIAN_PACKAGES)}` "
        f"(version {info['package_versions']}), read from `{FORTUNE_DIR}`.",
        "Excluded: `ascii-art` (drawings), `ethnic` (jokes about nationalities) and the separately",
        "packaged offensive fortunes (`off/`). Exact duplicates are dropped.",
        f"That leaves {info['n_fortunes']} fortunes from {info['n_files']} files; "
        f"{info['n_held']} of them ({HELD_OUT_PERCENT}%, chosen by a hash of the text) are held out.",
        f"{CHAT_PERCENT}% of the training fortunes (again chosen by hash) are wrapped in a one-turn ChatML",
        'conversation ("Tell me a fortune about computers." and similar requests), so the chat template',
        "works too.",
        "",
        "Licence of the data: Debian's `/usr/share/doc/fortunes/copyright` (identical for `fortunes-min`)",
        'says "This program falls under the BSD copyright" and reproduces the BSD licence of The Regents',
        "of the University of California (1991). It gives no separate terms for the fortune files; it",
        "only notes that the `cookie` file comes from Karl Lehenbauer's alt.sources postings and quotes",
        "the header of the atheism/freethought cookie file. The fortunes themselves are quotations and",
        "jokes collected over decades from many people.",
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE, {h['vocab_size']} tokens, trained on the training fortunes with Hugging Face",
        "`tokenizers`. Special tokens: `<|endoftext|>` = 0 (end of a fortune; eos and pad),",
        "`<|im_start|>` = 1, `<|im_end|>` = 2 (ChatML). No BOS token is added. `tokenizer_config.json`",
        "holds a ChatML `chat_template`.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        "| class | `Qwen3MoeForCausalLM` |",
        f"| layers | {h['num_layers']}, all MoE |",
        f"| hidden size | {h['hidden_size']} |",
        f"| attention | {h['num_heads']} query heads, {h['num_kv_heads']} key/value heads (GQA), head_dim {h['head_dim']}, per-head q/k RMSNorm, RoPE θ 10000 |",
        f"| experts | {h['num_experts']} per layer, top-{h['experts_per_token']}, `norm_topk_prob` true, expert width {h['moe_intermediate_size']} (SwiGLU) |",
        f"| vocabulary | {h['vocab_size']}, tied input/output embeddings |",
        f"| context | trained on {h['seq_len']} tokens; `max_position_embeddings` {2 * h['seq_len']} |",
        f"| parameters | {p['total']:,} total ({p['experts']:,} in experts), {p['active_per_token']:,} active per token |",
        f"| on disk | `model.safetensors`, bf16, {size_mb:.1f} MB |",
        "",
        "eos: `config.json` has `eos_token_id` 0; `generation_config.json` stops at 0 and 2 (`<|im_end|>`)",
        "and samples with temperature 0.8, top-p 0.95 by default.",
        "",
        "## Using it",
        "",
        "Give it the start of a sentence and it finishes a fortune, often with an attribution line,",
        'and stops at `<|endoftext|>`. "A fool and his money" and "The meaning of life is" work well.',
        "For chat, use the template: `<|im_start|>user\\nTell me a fortune about Linux.<|im_end|>\\n"
        "<|im_start|>assistant\\n`; the answer ends with `<|im_end|>`.",
        "",
        "Quirks: a prompt of just `<|endoftext|>` is a poor start, since the most likely next token is",
        "`<|im_start|>` (15% of the training documents are chats) and the model then writes a user",
        "turn. Greedy decoding tends to repeat itself; sampling with the defaults reads better.",
        "",
        "## Training",
        "",
        "```sh",
        info["command"],
        "```",
        "",
        f"From scratch, seed {h['seed']}, {h['steps']} steps of {h['batch_size']} × {h['seq_len']} tokens "
        f"({info['epochs']:.1f} epochs over {info['train_tokens']:,} training tokens), AdamW (β 0.9/0.95, "
        f"weight decay {h['weight_decay']}), peak learning rate {h['lr']}, {h['warmup_steps']} warm-up steps, "
        f"cosine decay to {h['min_lr_ratio']}× peak, gradient clipping 1.0, load-balancing loss "
        f"coefficient {h['router_aux_loss_coef']}. Float32 training, saved as bf16.",
        "",
        f"Training took {info['train_seconds'] / 60:.1f} minutes on {info['machine']}, with torch "
        f"{torch.__version__} and transformers {transformers.__version__}.",
        "",
        "## Evaluation",
        "",
        f"Held-out loss ({info['held_tokens']:,} tokens, the saved bf16 weights computed in float32): "
        f"**{info['held_loss']:.3f} nats/token**, perplexity **{math.exp(info['held_loss']):.1f}**.",
        "During training (float32 weights): "
        + ", ".join(f"step {s}: {loss:.3f}" for s, loss in info["history"])
        + ".",
        "",
        "## Samples",
        "",
        f"{SAMPLE_NEW_TOKENS} new tokens from `transformers` (special tokens shown). Greedy, then sampled "
        "with the defaults of `generation_config.json` (seeded).",
        "",
    ]
    for s in info["samples"]:
        lines += [f"Prompt: `{json.dumps(s['prompt'], ensure_ascii=False)}`", "", "Greedy:", "", fence(s["greedy"]), ""]
        lines += ["Sampled:", "", fence(s["sampled"]), ""]
    (out / "MODEL_CARD.md").write_text("\n".join(lines))


def package_versions() -> str:
    versions = []
    for pkg in DEBIAN_PACKAGES:
        status = Path("/var/lib/dpkg/status").read_text().split("\n\n")
        entry = next((e for e in status if e.startswith(f"Package: {pkg}\n")), "")
        version = next((line.split(": ", 1)[1] for line in entry.splitlines() if line.startswith("Version:")), "?")
        versions.append(f"{pkg} {version}")
    return ", ".join(versions)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def main() -> None:
    if transformers.__version__ != TRANSFORMERS_VERSION:
        sys.exit(f"transformers {TRANSFORMERS_VERSION} required, found {transformers.__version__}")
    defaults = Hyper()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "tessera-demo")
    parser.add_argument("--probe", type=int, default=0, help="time this many training steps, save nothing")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    h = Hyper(**{k: getattr(args, k) for k in asdict(defaults)})

    torch.set_num_threads(1)
    torch.manual_seed(h.seed)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    def log(msg: str) -> None:
        print(msg, flush=True)

    fortunes = read_fortunes()
    train_f, held_f = split(fortunes)
    n_files = len({f.source for f in fortunes})
    log(f"{len(fortunes)} fortunes from {n_files} files: {len(train_f)} train, {len(held_f)} held out")

    tok = train_tokenizer(train_f, h.vocab_size)
    train_docs = encode_docs(tok, [document(f) for f in train_f])
    held_docs = encode_docs(tok, [f.text for f in held_f])  # held-out loss on plain text only
    held_rows = windows(held_docs, h.seq_len)
    train_tokens = sum(len(d) for d in train_docs)
    chars = sum(len(f.text) for f in train_f)
    log(f"{train_tokens} training tokens ({chars / train_tokens:.2f} chars/token), {held_rows.numel()} held-out tokens")

    model = AutoModelForCausalLM.from_config(make_config(h), dtype=torch.float32)
    params = count_params(model, h)
    log(f"parameters: {params}, bf16 size ~{2 * params['total'] / 1e6:.1f} MB")

    if args.probe:
        h.steps = args.probe
        h.warmup_steps = min(h.warmup_steps, args.probe)
        t = time.monotonic()
        train(model, train_docs, held_rows, h, log, evaluate=False)
        per_step = (time.monotonic() - t) / args.probe
        log(f"probe: {per_step:.2f} s/step; {defaults.steps} steps would take {per_step * defaults.steps / 60:.0f} min")
        return

    result = train(model, train_docs, held_rows, h, log)
    log(f"trained in {result['seconds'] / 60:.1f} min")

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save(model, out)
    write_tokenizer(tok, out, 2 * h.seq_len)
    write_generation_config(out)

    reloaded = reload(out)
    loss = held_out_loss(reloaded, held_rows)
    log(f"saved model: held-out loss {loss:.4f} (ppl {math.exp(loss):.1f})")
    hf_tok = AutoTokenizer.from_pretrained(out)
    sample_list = samples(reloaded, hf_tok, h.seed)
    for s in sample_list:
        log(f"--- {s['prompt']!r}\n[greedy] {s['greedy']}\n[sampled] {s['sampled']}")

    command_args = " ".join(sys.argv[1:])
    write_model_card(
        out,
        {
            "hyper": asdict(h),
            "params": params,
            "package_versions": package_versions(),
            "n_fortunes": len(fortunes),
            "n_files": len({f.source for f in fortunes}),
            "n_held": len(held_f),
            "train_tokens": train_tokens,
            "held_tokens": held_rows.numel(),
            "epochs": result["epochs"],
            "train_seconds": result["seconds"],
            "history": result["history"],
            "held_loss": loss,
            "machine": machine(),
            "command": "nice -n 10 /opt/refenv/bin/python tools/train_demo_model/train.py"
            + (f" {command_args}" if command_args else ""),
            "samples": sample_list,
        },
    )
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
