"""GGUF files (llama.cpp's format) -> our `LLMConfig`, LLaMA-family tensors and a Hugging Face tokenizer.

    cfg = config_from_gguf(read_metadata(path))                # llama.* / qwen2.* keys -> LLMConfig
    tensors = GGUFTensors(path)                                # HF names, [out, in] fp32, one tensor per read
    tok = tokenizer_from_gguf(path)                            # byte-level BPE rebuilt from the vocab + merges

Owns: the GGUF side of LLM loading: metadata -> config, GGUF tensor names -> Hugging Face names (so
`hf_llm.hf_to_ours_lazy` maps them on, as it does safetensors), dequantization through the `gguf` package
(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_*, and the K-quants it knows), llama.cpp's rotary row order of the q / k
projections undone, and the tokenizer rebuilt from `tokenizer.ggml.*` (its control tokens special, its chat
template kept).

GGUF stores a weight with its fastest axis first (ggml's ne0 = in_features); the `gguf` reader hands it to
numpy reversed, [out, in], which is Hugging Face's layout. llama.cpp's converter permutes the rows of q_proj
and k_proj of LLaMA-architecture files so that each head's rotary pairs sit interleaved (ggml's RoPE rotates
neighbouring elements, HF's rotates halves); `_unpermute` puts the halves back. Qwen2 files are not permuted.

Does not own: the LLaMA name mapping into our model (`hf_llm`), placing tensors on the mesh (`init`), the
chat layout (`cig_jax/data/chat_template.py`).
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers

from cig_jax.config_model import LLMConfig, RopeScalingConfig
from cig_jax.convert.checkpoint_io import CheckpointError, TensorIndex

ARCHITECTURES = ("llama", "qwen2")  # decoders whose GGUF tensors map onto `LLM`
_PERMUTED = ("llama",)  # architectures whose q / k rows llama.cpp interleaves
# GGUF per-layer tensor -> Hugging Face name under model.layers.{i}.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
# llama.cpp's pre-tokenizer names -> how text is split before byte-level BPE (a regex, or digits split singly
# before GPT-2's rule, or GPT-2's rule alone)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"default": "gpt2", "gpt2": "gpt2", "smollm": "digits", "starcoder": "digits",
                  "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _LLAMA3_SPLIT}
CONTROL = 3  # tokenizer.ggml.token_type of control tokens (<|im_start|>, <|endoftext|>): added as special


def _reader(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def read_metadata(path: str | Path) -> dict:
    """The GGUF file's key-value metadata as Python values (the vocabulary lists included)."""
    return {k: f.contents() for k, f in _reader(path).fields.items() if not k.startswith("GGUF.")}


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def load_config(path: str | Path, **overrides) -> LLMConfig:
    """The LLMConfig of a GGUF file (its metadata, and whether it stores an output head)."""
    return config_from_gguf(read_metadata(path), tied=GGUFTensors(path).tied, source=str(path), **overrides)


def config_from_gguf(meta: dict, *, tied: bool, source: str = "<gguf>", **overrides) -> LLMConfig:
    """Our LLMConfig from a GGUF file's metadata (`llama.*` or `qwen2.*` keys); `tied`: the file has no
    `output.weight` (the head reads the token embedding)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{source}: general.architecture {arch!r} is not a supported decoder {ARCHITECTURES}")

    def get(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise CheckpointError(f"{source}: metadata key {arch}.{key} missing")
        return v

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
    if not vocab:
        raise CheckpointError(f"{source}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary")
    scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        scaling = RopeScalingConfig(type="linear", factor=float(get("rope.scaling.factor")))
    elif kind not in ("none", None):
        raise CheckpointError(f"{source}: RoPE scaling {kind!r} is not supported here (none, linear)")
    kw = dict(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")), num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                     or hidden // heads),
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 4096)), qkv_bias=arch == "qwen2",
        tie_word_embeddings=tied,
    )
    kw.update(overrides)
    return LLMConfig(**kw)


def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-5, not 9.999999747378752e-06)."""
    return float(f"{float(x):.7g}")


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q / k row permutation ([out, ...]: each head's rows (pairs interleaved) -> halves)."""
    d = w.shape[0] // heads // 2
    return w.reshape(heads, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFTensors(TensorIndex):
    """A GGUF file's LLaMA-family tensors under Hugging Face names, read one at a time: `keys()` and
    `shape(name)` come from the header, `[name]` dequantizes that tensor to fp32 ([out, in], q / k rows in
    HF order). Unknown tensors (e.g. llama.cpp's `rope_freqs`) raise one CheckpointError naming them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        r = _reader(self.path)
        meta = {k: f.contents() for k, f in r.fields.items() if k == "general.architecture" or k.endswith(
            (".attention.head_count", ".attention.head_count_kv"))}
        self.arch = meta.get("general.architecture")
        heads_kv = meta.get(f"{self.arch}.attention.head_count_kv")
        self.heads = {"q_proj": meta.get(f"{self.arch}.attention.head_count")}
        self.heads["k_proj"] = heads_kv or self.heads["q_proj"]
        self._where, unknown = {}, []
        for t in r.tensors:
            name = _hf_name(t.name)
            if name is None:
                unknown.append(t.name)
                continue
            self._where[name] = t
        if unknown:
            raise CheckpointError(f"{self.path}: tensors with no place in a LLaMA-family decoder: {unknown[:8]}")

    @property
    def tied(self) -> bool:
        return "lm_head.weight" not in self._where

    def shape(self, name: str) -> tuple:
        return tuple(int(n) for n in reversed(self._where[name].shape))

    def qtype(self, name: str) -> str:
        return self._where[name].tensor_type.name

    def __getitem__(self, name: str) -> np.ndarray:
        t = self._where[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {t.name} is {t.tensor_type.name}, which the gguf package "
                                  "cannot dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_*, K-quants)") from None
        w = np.asarray(w, np.float32).reshape(self.shape(name))
        proj = name.rsplit(".", 2)[-2]
        if self.arch in _PERMUTED and proj in self.heads and name.endswith(".weight"):
            w = _unpermute(w, int(self.heads[proj]))
        return w


def _hf_name(name: str) -> str | None:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def tokenizer_from_gguf(path: str | Path):
    """A Hugging Face fast tokenizer rebuilt from the file's `tokenizer.ggml.*` (byte-level BPE: `gpt2`): the
    vocabulary and merges, the pre-tokenizer llama.cpp names (`tokenizer.ggml.pre`), the control tokens as
    special tokens, bos / eos / unk / pad, and `tokenizer.chat_template`."""
    meta = read_metadata(path)
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model {model!r}: only byte-level BPE ('gpt2') vocabularies are "
                              "rebuilt here; give init_weights.tokenizer a Hugging Face tokenizer folder instead")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    rule = PRE_TOKENIZERS.get(pre)
    if rule is None:
        raise CheckpointError(f"{path}: tokenizer.ggml.pre {pre!r} is not one of {sorted(PRE_TOKENIZERS)}")
    bpe = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                          fuse_unk=False, byte_fallback=False))
    if rule == "gpt2":
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif rule == "digits":
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(rule), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    control = [t for t, kind in zip(tokens, types) if kind == CONTROL]
    bpe.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in control])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and int(i) < len(tokens) else None

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=token("bos"), eos_token=token("eos"), unk_token=token("unknown"),
        pad_token=token("padding"), clean_up_tokenization_spaces=False)
    if meta.get("tokenizer.chat_template"):
        tok.chat_template = meta["tokenizer.chat_template"]
    return tok
