"""Byte-level BPE tokenizer built from the vocabulary embedded in a GGUF file.

GGUF files written by llama.cpp's converter carry the tokenizer as metadata:
``tokenizer.ggml.model`` (``"gpt2"`` = byte-level BPE), ``tokenizer.ggml.pre`` (the
pre-tokenizer family), ``tokenizer.ggml.tokens`` / ``token_type`` / ``merges``, the ids of the
BOS/EOS tokens and a Jinja ``tokenizer.chat_template``. This module rebuilds the tokenizer with
the ``tokenizers`` library (BPE model, byte-level pre-tokenizer and decoder; Radford et al.,
2019, "Language Models are Unsupervised Multitask Learners", section 2.2), renders the chat
template with Jinja2, and decodes generated tokens incrementally without ever splitting a
multi-byte UTF-8 character (:class:`StreamDecoder`).
"""

from __future__ import annotations

import codecs
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

__all__ = ["Tokenizer", "StreamDecoder", "byte_to_unicode"]

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Control tokens that end a generation when a model's vocabulary has them (as in llama.cpp's
# end-of-generation list), in addition to the GGUF EOS/EOT ids and the chat template's end marker.
END_OF_GENERATION_MARKERS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>")

# Regex of the Llama 3 pre-tokenizer (``tokenizer.ggml.pre = "llama-bpe"``).
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Pre-tokenizer families that split every digit on its own before the GPT-2 regex.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")
# Pre-tokenizer families that are exactly the GPT-2 regex.
_GPT2_PRE = ("gpt2", "default", "gpt-2", "mpt", "olmo", "jais")


def byte_to_unicode() -> Dict[int, str]:
    """The byte-level BPE alphabet: a printable character for each of the 256 byte values.

    Bytes that are printable Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand
    for themselves; the other 68 bytes, in increasing order, get the characters U+0100, U+0101,
    ... (so the space 0x20 is ``Ġ`` U+0120 and the newline 0x0A is ``Ċ`` U+010A).

    Returns:
        dict mapping each byte value 0..255 to a one-character string.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """Byte-level BPE tokenizer plus chat template and stop tokens of one model.

    Args:
        tokens: the vocabulary, token id ``i`` is ``tokens[i]`` (byte-level alphabet strings).
        token_types: GGUF token type per id (1 normal, 3 control, 4 user-defined, ...).
            Control tokens become special tokens and user-defined tokens added tokens: both
            are matched in the input text before BPE, so each encodes as a single id.
        merges: BPE merges in priority order, each ``"left right"``.
        pre: GGUF ``tokenizer.ggml.pre`` name; ``"smollm"`` (and the StarCoder family) split
            every digit on its own and then apply the GPT-2 regex; ``"gpt2"``/``"default"``
            apply the GPT-2 regex; ``"llama-bpe"`` the Llama 3 regex.
        bos_id, eos_id, eot_id: ids from the GGUF metadata (``None`` when absent).
        add_bos: prepend ``bos_id`` in :meth:`encode` (GGUF ``tokenizer.ggml.add_bos_token``).
        chat_template: the Jinja chat template, or ``None``.

    Raises:
        ValueError: when the lists disagree in length or ``pre`` is unknown.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int],
        merges: Sequence[str],
        *,
        pre: str = "gpt2",
        bos_id: Optional[int] = None,
        eos_id: Optional[int] = None,
        eot_id: Optional[int] = None,
        add_bos: bool = False,
        chat_template: Optional[str] = None,
    ) -> None:
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as _HFTokenizer

        if len(tokens) != len(token_types):
            raise ValueError(f"Tokenizer: {len(tokens)} tokens but {len(token_types)} token types")
        self.tokens: List[str] = list(tokens)
        self.token_types: List[int] = [int(t) for t in token_types]
        self.pre = pre
        self.bos_id, self.eos_id, self.eot_id = bos_id, eos_id, eot_id
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template

        vocab = {tok: i for i, tok in enumerate(self.tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
        tk = _HFTokenizer(bpe)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _DIGIT_SPLIT_PRE:
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in _GPT2_PRE:
            tk.pre_tokenizer = byte_level
        elif pre in ("llama-bpe", "llama3"):
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            raise ValueError(
                f"Tokenizer: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}; "
                f"supported: {sorted(_DIGIT_SPLIT_PRE + _GPT2_PRE + ('llama-bpe',))}"
            )
        tk.decoder = decoders.ByteLevel()
        control = [self.tokens[i] for i, t in enumerate(self.token_types) if t == TOKEN_CONTROL]
        user = [self.tokens[i] for i, t in enumerate(self.token_types) if t == TOKEN_USER_DEFINED]
        tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in control])
        tk.add_tokens([AddedToken(s, special=False, normalized=False) for s in user])
        self._tk = tk

        # Bytes of every token, for exact incremental decoding.
        to_byte = {ch: b for b, ch in byte_to_unicode().items()}
        self._bytes: List[bytes] = []
        for tok, kind in zip(self.tokens, self.token_types):
            if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
                self._bytes.append(tok.encode("utf-8"))
            else:
                self._bytes.append(
                    b"".join(bytes([to_byte[ch]]) if ch in to_byte else ch.encode("utf-8") for ch in tok)
                )
        self.stop_ids: frozenset = frozenset(self._find_stop_ids())

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf(cls, path_or_reader) -> Tokenizer:
        """Build the tokenizer of a GGUF file.

        Args:
            path_or_reader: path to a ``.gguf`` file, or an open ``gguf.GGUFReader``.

        Raises:
            ValueError: when the file has no tokenizer or one other than byte-level BPE
                (``tokenizer.ggml.model`` must be ``"gpt2"``).
        """
        from .models.gguf_loader import GGUFMetadata

        meta = GGUFMetadata.open(path_or_reader)
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"Tokenizer.from_gguf: only byte-level BPE tokenizers "
                f"(tokenizer.ggml.model='gpt2') are supported, the file has {kind!r}"
            )
        tokens = meta.get("tokenizer.ggml.tokens")
        types = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        return cls(
            tokens,
            types,
            meta.get("tokenizer.ggml.merges") or [],
            pre=meta.get("tokenizer.ggml.pre", "default"),
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_id=meta.get("tokenizer.ggml.eos_token_id"),
            eot_id=meta.get("tokenizer.ggml.eot_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    # ------------------------------------------------------------------ encoding / decoding
    @property
    def vocab_size(self) -> int:
        """Number of token ids (``V``)."""
        return len(self.tokens)

    def encode(self, text: str, *, add_bos: Optional[bool] = None) -> List[int]:
        """Token ids of ``text``; special tokens written in the text (e.g. ``<|im_start|>``)
        become their single ids.

        Args:
            text: the input string.
            add_bos: prepend the BOS id; defaults to the GGUF ``add_bos_token`` flag. It is not
                added twice when the text already starts with the BOS token.

        Returns:
            list of int token ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        ids = self._tk.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos if add_bos is None else add_bos
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of token ids (invalid UTF-8 is replaced by U+FFFD).

        Args:
            ids: token ids in ``[0, vocab_size)``.
            skip_special_tokens: drop control tokens.
        """
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token ``token_id`` stands for (control tokens: their UTF-8 text).

        Raises:
            IndexError: when the id is out of range.
        """
        if not 0 <= token_id < len(self._bytes):
            raise IndexError(f"token_bytes: token id {token_id} outside [0, {len(self._bytes)})")
        return self._bytes[token_id]

    def token_id(self, token: str) -> Optional[int]:
        """Id of the vocabulary entry ``token`` (exact string), or ``None``."""
        return self._tk.token_to_id(token)

    # ------------------------------------------------------------------ chat template
    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render the model's Jinja chat template.

        Args:
            messages: e.g. ``[{"role": "user", "content": "Hi"}]``.
            add_generation_prompt: end with the header of an assistant turn.

        Returns:
            the prompt text (encode it with :meth:`encode`).

        Raises:
            ValueError: when the model has no chat template, or the template raises.
        """
        if not self.chat_template:
            raise ValueError("apply_chat_template: this model has no tokenizer.chat_template")
        return _render(
            self.chat_template,
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self._text_of(self.bos_id),
            eos_token=self._text_of(self.eos_id),
        )

    def _text_of(self, token_id: Optional[int]) -> str:
        return self.tokens[token_id] if token_id is not None and 0 <= token_id < len(self.tokens) else ""

    def _find_stop_ids(self) -> List[int]:
        """GGUF EOS/EOT ids, the control token that ends a turn in the chat template, and the
        known end-of-generation control tokens present in the vocabulary."""
        stop = [i for i in (self.eos_id, self.eot_id) if i is not None and 0 <= i < len(self.tokens)]
        control = {self.tokens[i]: i for i, t in enumerate(self.token_types) if t == TOKEN_CONTROL}
        if self.chat_template:
            sentinel = "\x00decodekit-sentinel\x00"
            try:
                text = self.apply_chat_template([{"role": "user", "content": sentinel}], add_generation_prompt=False)
            except (ValueError, TypeError, KeyError, IndexError):  # a probe must not block loading
                text = ""
            tail = text.split(sentinel, 1)[1] if sentinel in text else ""
            for marker in sorted(control, key=len, reverse=True):
                if tail.startswith(marker):
                    stop.append(control[marker])
                    break
        stop += [control[m] for m in END_OF_GENERATION_MARKERS if m in control]
        return sorted(set(stop))


class StreamDecoder:
    """Incremental detokeniser: turns generated token ids into text pieces as they arrive.

    Each token's bytes go through an incremental UTF-8 decoder, so a character whose bytes are
    spread over several tokens is emitted only once complete: no piece ever ends in a partial
    character, and the concatenation of all pieces (including :meth:`flush`) equals
    ``b"".join(token bytes).decode("utf-8", "replace")``. U+FFFD appears only for bytes that
    can never form valid UTF-8.

    Args:
        tokenizer: the :class:`Tokenizer` whose ids will be pushed.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; returns the newly completed text (possibly ``""``)."""
        return self._utf8.decode(self._tokenizer.token_bytes(int(token_id)))

    def flush(self) -> str:
        """End of stream: returns any held-back bytes (as U+FFFD if they are incomplete)."""
        return self._utf8.decode(b"", final=True)


def _render(template: str, **context) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(**context)
    except jinja2.exceptions.TemplateError as exc:
        raise ValueError(f"chat template failed: {exc}") from exc
