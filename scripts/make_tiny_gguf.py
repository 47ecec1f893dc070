#!/usr/bin/env python3
"""Write a tiny random-weight llama GGUF that a real llama-server loads.

    scripts/make_tiny_gguf.py OUT.gguf [--seed N] [--vocab VOCAB.gguf]
                              [--llama-server PATH] [--gguf-py DIR]

The weights are random (seeded), so the model talks gibberish, but it is a
genuine llama-architecture model (2 layers, n_embd 64, 4 heads, n_ff 128,
context 256) with a real tokenizer: every ``tokenizer.*`` field of a vocabulary
GGUF from the llama.cpp source tree (``models/ggml-vocab-llama-spm.gguf`` by
default) is copied over.  The output embedding is tied to the token embedding
(no ``output.weight``), which keeps the file at about 9 MB.

Where things are looked for, when not given:

* the vocabulary: ``$LLAMASWAP_GGUF_VOCAB``, else as below;
* the vocabulary and the ``gguf`` package: next to the llama-server binary
  that ``scripts/build-llama-server.sh`` left in its cache directory
  (``<dir>/bin/llama-server``, ``<dir>/models/``, ``<dir>/gguf-py/``), the
  binary being ``--llama-server``, else ``$LLAMASWAP_LLAMA_SERVER``, else the
  newest ``${XDG_CACHE_HOME:-~/.cache}/llamaswap/llama-server-*``;
* the ``gguf`` package then falls back to the one installed (PyPI ``gguf``).

Importable too: ``make_tiny_gguf(out, seed=..., vocab=...)``.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys

VOCAB_NAME = "ggml-vocab-llama-spm.gguf"

# a small, explicit chat template, so /v1/chat/completions does not depend on
# llama-server's fallback choice
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

HPARAMS = dict(n_layer=2, n_embd=64, n_head=4, n_head_kv=4, n_ff=128, n_ctx=256)


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llamaswap")


def _version_key(path: str):
    match = re.search(r"llama-server-([0-9][0-9.]*)", path)
    return tuple(int(p) for p in match.group(1).strip(".").split(".")) if match else ()


def cached_builds() -> list[str]:
    """Build directories of scripts/build-llama-server.sh, newest first."""
    found = glob.glob(os.path.join(cache_root(), "llama-server-*", "bin", "llama-server"))
    dirs = [os.path.dirname(os.path.dirname(p)) for p in found]
    return sorted(dirs, key=_version_key, reverse=True)


def build_dirs(llama_server: str | None = None) -> list[str]:
    """Candidate build directories: the given binary's, the env's, the cache's."""
    dirs = []
    for binary in (llama_server, os.environ.get("LLAMASWAP_LLAMA_SERVER")):
        if binary:
            dirs.append(os.path.dirname(os.path.dirname(os.path.realpath(binary))))
    dirs.extend(cached_builds())
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def find_vocab(llama_server: str | None = None) -> str | None:
    explicit = os.environ.get("LLAMASWAP_GGUF_VOCAB")
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    for d in build_dirs(llama_server):
        path = os.path.join(d, "models", VOCAB_NAME)
        if os.path.isfile(path):
            return path
    return None


def import_gguf(gguf_py: str | None = None, llama_server: str | None = None):
    """Import gguf, preferring the copy from the same llama.cpp tree."""
    candidates = [gguf_py] if gguf_py else []
    candidates += [os.path.join(d, "gguf-py") for d in build_dirs(llama_server)]
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "gguf", "__init__.py")):
            if "gguf" not in sys.modules and path not in sys.path:
                sys.path.insert(0, path)
            break
    import gguf  # noqa: E402  (PyPI `gguf` when no tree copy was found)
    return gguf


def make_tiny_gguf(out: str, seed: int = 0, vocab: str | None = None,
                   llama_server: str | None = None, gguf_py: str | None = None,
                   name: str | None = None) -> str:
    gguf = import_gguf(gguf_py, llama_server)
    import numpy as np

    vocab = vocab or find_vocab(llama_server)
    if not vocab or not os.path.isfile(vocab):
        raise FileNotFoundError(
            f"no {VOCAB_NAME}: pass --vocab, or build with scripts/build-llama-server.sh")

    reader = gguf.GGUFReader(vocab)
    tokenizer_fields = [f for key, f in reader.fields.items() if key.startswith("tokenizer.")]
    tokens = reader.fields["tokenizer.ggml.tokens"]
    n_vocab = len(tokens.data)

    hp = HPARAMS
    head_dim = hp["n_embd"] // hp["n_head"]
    arch = "llama"
    writer = gguf.GGUFWriter(out, arch)
    writer.add_name(name or f"tiny-random-llama-s{seed}")
    writer.add_context_length(hp["n_ctx"])
    writer.add_embedding_length(hp["n_embd"])
    writer.add_block_count(hp["n_layer"])
    writer.add_feed_forward_length(hp["n_ff"])
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_head_kv"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    # the tokenizer, field for field (strings kept as raw bytes)
    T = gguf.GGUFValueType
    for field in tokenizer_fields:
        main = field.types[0]
        if main == T.ARRAY:
            sub = field.types[-1]
            if sub == T.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = field.contents()
            writer.add_key_value(field.name, value, T.ARRAY, sub)
        elif main == T.STRING:
            writer.add_key_value(field.name, bytes(field.parts[-1]), T.STRING)
        else:
            writer.add_key_value(field.name, field.contents(), main)
    if "tokenizer.chat_template" not in reader.fields:
        writer.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> np.ndarray:
        # numpy (rows, cols) is ggml's [cols, rows]: rows = outputs
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    n_embd, n_ff = hp["n_embd"], hp["n_ff"]
    n_embd_kv = head_dim * hp["n_head_kv"]
    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    writer.add_tensor("output_norm.weight", ones(n_embd))
    for i in range(hp["n_layer"]):
        blk = f"blk.{i}."
        writer.add_tensor(blk + "attn_norm.weight", ones(n_embd))
        writer.add_tensor(blk + "attn_q.weight", weight(n_embd, n_embd))
        writer.add_tensor(blk + "attn_k.weight", weight(n_embd_kv, n_embd))
        writer.add_tensor(blk + "attn_v.weight", weight(n_embd_kv, n_embd))
        writer.add_tensor(blk + "attn_output.weight", weight(n_embd, n_embd))
        writer.add_tensor(blk + "ffn_norm.weight", ones(n_embd))
        writer.add_tensor(blk + "ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(blk + "ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(blk + "ffn_down.weight", weight(n_embd, n_ff))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the .gguf file to write")
    parser.add_argument("--seed", type=int, default=0, help="weights' random seed (default 0)")
    parser.add_argument("--vocab", help=f"vocabulary GGUF to copy the tokenizer from ({VOCAB_NAME})")
    parser.add_argument("--llama-server", help="the llama-server whose build directory to use")
    parser.add_argument("--gguf-py", help="a directory holding the gguf package (llama.cpp's gguf-py)")
    parser.add_argument("--name", help="general.name")
    args = parser.parse_args(argv)
    try:
        make_tiny_gguf(args.out, seed=args.seed, vocab=args.vocab, llama_server=args.llama_server,
                       gguf_py=args.gguf_py, name=args.name)
    except FileNotFoundError as e:
        print(f"make_tiny_gguf: {e}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
